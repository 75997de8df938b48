//! Which implementation serves each projection: the one place that names every model.
//!
//! It exists so that [`crate::projection`] (the contract and the shared types) does not have
//! to: the models depend on `projection`, this module depends on both, and the projector,
//! dead-letter handling and rebuilds reach a model through [`get`] by its [`Kind`]. The match
//! is exhaustive, so a new `Kind` does not compile until it is registered here.

use crate::{
    order_summary::OrderSummary,
    projection::{Kind, Projection},
    sales::SalesByProduct,
};

/// The implementation of `kind`.
pub fn get(kind: Kind) -> &'static dyn Projection {
    match kind {
        Kind::OrderSummary => &OrderSummary,
        Kind::SalesByProduct => &SalesByProduct,
    }
}

/// Every projection, in [`Kind::ALL`] order.
pub fn all() -> impl Iterator<Item = &'static dyn Projection> {
    Kind::ALL.into_iter().map(get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_served_by_its_own_projection() {
        for (kind, p) in Kind::ALL.into_iter().zip(all()) {
            assert_eq!(p.kind(), kind);
            assert_eq!(p.name(), kind.name());
            assert!(!p.tables().is_empty(), "{kind:?} has no tables");
        }
        assert_eq!(all().count(), Kind::ALL.len());
    }
}
