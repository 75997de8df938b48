//! The shop's catalog: what may be bought, at which price, in which currency (the table
//! `catalog_products`, owned by this crate).
//!
//! Prices belong to the shop, never to the client: a checkout names products and quantities,
//! [`prices`] looks them up (checkouts through [`Prices`], checked again when written), and
//! the order aggregate records the prices it was placed at in
//! `OrderPlaced`, so a later price change never alters a placed order (events stored before
//! the catalog existed keep the prices they recorded). Prices are bounded (at most
//! [`MAX_PRICE_MINOR`]) so that no order total can overflow: 100 lines x 1,000 units x the
//! largest price still fits in 64-bit minor units.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use domain::values::{Currency, MinorUnits, Sku, ValueError};
use sqlx::{PgPool, Row};

/// The largest price in minor units (1,000,000,000.00 in a two-decimal currency).
pub const MAX_PRICE_MINOR: i64 = 100_000_000_000;

/// A product as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub sku: Sku,
    pub name: String,
    pub price_minor: MinorUnits,
    pub currency: Currency,
    /// Inactive products cannot be bought (they stay for the record).
    pub active: bool,
}

impl Product {
    /// A product from operator input, validated.
    pub fn parse(
        sku: &str,
        name: &str,
        price_minor: i64,
        currency: &str,
        active: bool,
    ) -> Result<Self, ValueError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(ValueError::new(
                "name",
                "must be 1 to 200 characters, no control characters",
            ));
        }
        if price_minor > MAX_PRICE_MINOR {
            return Err(ValueError::new(
                "price_minor",
                format!("must be at most {MAX_PRICE_MINOR}"),
            ));
        }
        Ok(Self {
            sku: Sku::parse(sku)?,
            name: name.to_owned(),
            price_minor: MinorUnits::parse(price_minor).map_err(|e| ValueError {
                field: "price_minor".into(),
                ..e
            })?,
            currency: Currency::parse(currency)?,
            active,
        })
    }
}

/// The development catalog `shop catalog seed` writes where a product is not set yet (the
/// stand-in inventory stocks the same SKUs).
pub const DEVELOPMENT_CATALOG: [(&str, &str, i64); 5] = [
    ("SKU-1", "Espresso cup", 1250),
    ("SKU-2", "Saucer", 499),
    ("SKU-3", "Milk jug", 1990),
    ("SKU-4", "Coffee beans 1 kg", 2490),
    ("SKU-5", "Grinder", 8900),
];

/// The active products among `skus` (an unknown or inactive one is absent).
pub async fn prices(pool: &PgPool, skus: &[Sku]) -> Result<HashMap<Sku, Product>, sqlx::Error> {
    let names: Vec<&str> = skus.iter().map(Sku::as_str).collect();
    let rows = sqlx::query(
        "SELECT sku, name, price_minor, currency, active FROM catalog_products
         WHERE sku = ANY($1) AND active",
    )
    .bind(&names)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let p = product(r)?;
            Ok((p.sku.clone(), p))
        })
        .collect()
}

/// The prices checkouts are decided with, kept in memory: one query per checkout saved. What
/// is kept may be stale (a price changed, a product withdrawn, by any process); the writing
/// transaction checks every line against the catalog and a stale checkout is
/// decided again with [`Prices::get`]`(.., fresh = true)`, so no order is ever placed at a
/// price the catalog no longer has (see `crate::checkouts`). Holds only products that exist
/// (bounded by the catalog).
#[derive(Clone, Default)]
pub struct Prices {
    known: Arc<RwLock<HashMap<Sku, Product>>>,
}

impl Prices {
    /// The active products among `skus`: from memory when all are known and not `fresh`,
    /// otherwise from the catalog (and remembered).
    pub async fn get(
        &self,
        pool: &PgPool,
        skus: &[Sku],
        fresh: bool,
    ) -> Result<HashMap<Sku, Product>, sqlx::Error> {
        if !fresh {
            let known = self.known.read().expect("prices lock");
            let found: HashMap<Sku, Product> = skus
                .iter()
                .filter_map(|s| known.get(s).map(|p| (s.clone(), p.clone())))
                .collect();
            if skus.iter().all(|s| found.contains_key(s)) {
                return Ok(found);
            }
        }
        let found = prices(pool, skus).await?;
        let mut known = self.known.write().expect("prices lock");
        for sku in skus {
            match found.get(sku) {
                Some(p) => known.insert(sku.clone(), p.clone()),
                None => known.remove(sku),
            };
        }
        Ok(found)
    }
}

/// Every product, by SKU.
pub async fn list(pool: &PgPool) -> Result<Vec<Product>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT sku, name, price_minor, currency, active FROM catalog_products ORDER BY sku",
    )
    .fetch_all(pool)
    .await?;
    rows.iter().map(product).collect()
}

/// Creates or replaces a product.
pub async fn set(pool: &PgPool, p: &Product) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO catalog_products (sku, name, price_minor, currency, active)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name, price_minor = EXCLUDED.price_minor,
             currency = EXCLUDED.currency, active = EXCLUDED.active, updated_at = now()",
    )
    .bind(p.sku.as_str())
    .bind(&p.name)
    .bind(p.price_minor.get())
    .bind(p.currency.as_str())
    .bind(p.active)
    .execute(pool)
    .await?;
    Ok(())
}

/// Writes [`DEVELOPMENT_CATALOG`] (in EUR) where a product is not set yet; returns how many
/// were added.
pub async fn seed(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut added = 0;
    for (sku, name, price) in DEVELOPMENT_CATALOG {
        added += sqlx::query(
            "INSERT INTO catalog_products (sku, name, price_minor, currency) VALUES ($1, $2, $3, 'EUR')
             ON CONFLICT DO NOTHING",
        )
        .bind(sku)
        .bind(name)
        .bind(price)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(added)
}

fn product(r: &sqlx::postgres::PgRow) -> Result<Product, sqlx::Error> {
    let decode = |e: ValueError| sqlx::Error::Decode(Box::new(e));
    Ok(Product {
        sku: Sku::parse(r.try_get("sku")?).map_err(decode)?,
        name: r.try_get("name")?,
        price_minor: MinorUnits::parse(r.try_get("price_minor")?).map_err(decode)?,
        currency: Currency::parse(r.try_get::<&str, _>("currency")?).map_err(decode)?,
        active: r.try_get("active")?,
    })
}
