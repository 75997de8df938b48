//! Clients a test drives the system with: GraphQL queries and subscriptions, and a valid
//! checkout body.

use std::time::Duration;

/// A GraphQL client for one server.
pub struct Gql {
    pub url: String,
    pub http: reqwest::Client,
}

impl Gql {
    /// Serves `router` on an ephemeral port until `shutdown`.
    pub async fn serve(
        router: axum::Router,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/graphql", listener.local_addr().unwrap());
        tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .into_future(),
        );
        Self {
            url,
            http: reqwest::Client::new(),
        }
    }

    pub async fn query(
        &self,
        token: Option<&str>,
        query: &str,
        vars: serde_json::Value,
    ) -> serde_json::Value {
        let mut rb = self
            .http
            .post(&self.url)
            .json(&serde_json::json!({"query": query, "variables": vars}));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send().await.unwrap().json().await.unwrap()
    }

    /// Opens a `graphql-transport-ws` connection and sends `connection_init` (with the token
    /// in its payload when given). The connection if acknowledged, else what the server
    /// answered (a close frame's code and reason).
    pub async fn connect(&self, token: Option<&str>) -> Result<WsStream, String> {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
        let url = self.url.replacen("http://", "ws://", 1) + "/ws";
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| format!("upgrade refused: {e}"))?;
        let payload = match token {
            Some(t) => serde_json::json!({"Authorization": format!("Bearer {t}")}),
            None => serde_json::json!({}),
        };
        let init = serde_json::json!({"type": "connection_init", "payload": payload});
        ws.send(Message::text(init.to_string())).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(m))) if m.to_text().is_ok_and(|t| t.contains("connection_ack")) => Ok(ws),
            Ok(other) => Err(format!("{other:?}")),
            Err(_) => Err("no answer to connection_init within 30 s".into()),
        }
    }

    /// Opens an acknowledged connection ([`Gql::connect`]) and starts one subscription (id
    /// "1").
    pub async fn subscribe(
        &self,
        token: Option<&str>,
        query: &str,
        vars: serde_json::Value,
    ) -> Subscription {
        use futures::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        let mut ws = self.connect(token).await.expect("connection_ack");
        let sub = serde_json::json!({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": vars}});
        ws.send(Message::text(sub.to_string())).await.unwrap();
        Subscription { ws }
    }
}

/// A WebSocket client connection.
pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One GraphQL subscription over WebSocket.
pub struct Subscription {
    pub ws: WsStream,
}

impl Subscription {
    /// The next `next`/`error` message's payload (at most 60 s).
    pub async fn next(&mut self) -> serde_json::Value {
        use futures::StreamExt;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
                .await
                .expect("no subscription message within 60 s")
                .expect("websocket closed")
                .expect("websocket error");
            let Ok(text) = msg.to_text() else { continue };
            let v: serde_json::Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(_) => continue,
            };
            match v["type"].as_str() {
                Some("next") => return v["payload"].clone(),
                Some("error") => return serde_json::json!({"errors": v["payload"]}),
                _ => {}
            }
        }
    }
}

/// A valid checkout body.
pub fn checkout_body() -> serde_json::Value {
    serde_json::json!({
        "currency": "EUR",
        "items": [
            {"sku": "SKU-1", "quantity": 2},
            {"sku": "SKU-2", "quantity": 1}
        ],
        "shipping_address": {"name": "Ada Lovelace", "line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
        "payment_token": "tok_visa"
    })
}
