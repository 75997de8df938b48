//! The pages' frame (navigation, sign-out) and the small helpers every page uses: times,
//! pretty JSON, the CSRF field. One stylesheet, served by the console itself: no CDN, no
//! inline style or script (the Content-Security-Policy forbids both).

use axum::{http::header, response::IntoResponse};
use chrono::{DateTime, NaiveDateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::session::Operator;

const NAV: &[(&str, &str)] = &[
    ("/console", "Overview"),
    ("/console/orders/stuck", "Stuck orders"),
    ("/console/dead-letters", "Dead letters"),
    ("/console/sagas", "Sagas"),
    ("/console/projections", "Projections"),
    ("/console/outbox", "Outbox"),
    ("/console/audit", "Audit"),
    ("/console/activity", "Activity"),
];

/// A signed-in page.
pub fn page(op: &Operator, title: &str, body: Markup) -> Markup {
    framed(op, title, None, body)
}

/// A signed-in page that reloads itself (from `url`, every `secs`) while something it shows
/// is moving: live without JavaScript.
pub fn refreshing(op: &Operator, title: &str, every: Option<(u32, &str)>, body: Markup) -> Markup {
    framed(op, title, every, body)
}

fn framed(op: &Operator, title: &str, every: Option<(u32, &str)>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · shop console" }
                link rel="stylesheet" href="/console/console.css";
                @if let Some((secs, url)) = every {
                    meta http-equiv="refresh" content={ (secs) "; url=" (url) };
                }
            }
            body {
                header {
                    nav {
                        strong { "shop console" }
                        @for (href, name) in NAV { a href=(href) { (name) } }
                        form.search method="get" action="/console/orders" {
                            input name="id" placeholder="order or customer id" aria-label="order or customer id" {}
                            button type="submit" { "Open" }
                        }
                    }
                    form.signout method="post" action="/console/sign-out" {
                        span { (op.actor) }
                        (csrf(op))
                        button type="submit" { "Sign out" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A page without the frame (sign-in, errors).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · shop console" }
                link rel="stylesheet" href="/console/console.css";
            }
            body { main.narrow { (body) } }
        }
    }
}

/// The hidden field every form of the console carries.
pub fn csrf(op: &Operator) -> Markup {
    html! { input type="hidden" name="csrf" value=(op.csrf); }
}

pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

pub fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

pub async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("console.css"),
    )
}

/// A time from a form: `YYYY-MM-DDTHH:MM` (a datetime-local input, read as UTC) or RFC 3339.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M")
                .ok()
                .map(|t| t.and_utc())
        })
}
