//! `shop run` as a child process, started the way `scripts/run.sh` starts it, and a load
//! generator that talks to it the way a shop's clients do (HTTP in, GraphQL out).
//!
//! Why: tests of parts passed while the product did not start (a clap clash) and did not
//! heal (a role that died silently). These helpers let a test drive the real binary with
//! the real services: `shop setup`, `shop inventory seed`, then `shop run` with only the
//! environment `scripts/lib.sh` exports plus per-test isolation (its own database, topic
//! prefix, queue prefix and free ports), and stop it with SIGTERM or SIGKILL.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::{TestDb, unique_prefix};

/// A running (or stopped) `shop run` child over its own database and broker names.
pub struct ShopProcess {
    bin: PathBuf,
    child: std::sync::Mutex<Option<Child>>,
    env: Vec<(String, String)>,
    pub db: TestDb,
    pub prefix: String,
    pub api: String,
    pub graphql: String,
    pub ops: String,
    pub log: PathBuf,
    /// Where `shop run` writes its signed audit checkpoints (`AUDIT_CHECKPOINT_DIR`).
    pub checkpoints: PathBuf,
    pub http: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl ShopProcess {
    /// Sets up a fresh database and per-test names, runs `shop setup`, `shop catalog seed`
    /// and `shop inventory seed` (as `scripts/run.sh` does), starts `shop run` and waits for `/readyz`.
    pub async fn start(bin: &Path) -> Self {
        Self::start_with(bin, |_| Vec::new()).await
    }

    /// [`Self::start`] with settings of its own (e.g. TLS URLs, made from the test's
    /// database), which win over the per-test ones for every `shop` command it runs.
    pub async fn start_with(
        bin: &Path,
        settings: impl FnOnce(&TestDb) -> Vec<(String, String)>,
    ) -> Self {
        let db = TestDb::new().await;
        let prefix = format!("{}.", unique_prefix());
        let (api, graphql, ops) = (free_port(), free_port(), free_port());
        let checkpoints = std::env::temp_dir().join(format!("shop-{prefix}checkpoints"));
        let mut env: Vec<(String, String)> = vec![
            (
                "AUDIT_CHECKPOINT_DIR".into(),
                checkpoints.display().to_string(),
            ),
            ("DATABASE_URL".into(), db.url.clone()),
            ("KAFKA_TOPIC_PREFIX".into(), prefix.clone()),
            ("SAGA_QUEUE_PREFIX".into(), prefix.clone()),
            ("HTTP_ADDR".into(), format!("127.0.0.1:{api}")),
            ("GRAPHQL_ADDR".into(), format!("127.0.0.1:{graphql}")),
            ("OPS_ADDR".into(), format!("127.0.0.1:{ops}")),
            ("JWT_KEYS".into(), crate::TEST_JWT_KEYS.into()),
            ("AUDIT_KEYS".into(), crate::TEST_AUDIT_KEYS.into()),
            ("MASTER_KEYS".into(), crate::TEST_MASTER_KEYS.into()),
            // A load generator: one customer sends hundreds of orders a second.
            ("RATE_LIMIT_PER_SECOND".into(), "100000".into()),
            ("RATE_LIMIT_BURST".into(), "100000".into()),
            ("LOG_FORMAT".into(), "json".into()),
            (
                "RUST_LOG".into(),
                "info,librdkafka=warn,rdkafka=warn".into(),
            ),
        ];
        env.extend(settings(&db));
        let log = std::env::temp_dir().join(format!("shop-{}log", prefix));
        let this = Self {
            bin: bin.to_owned(),
            child: std::sync::Mutex::new(None),
            env,
            db,
            prefix,
            api: format!("http://127.0.0.1:{api}"),
            graphql: format!("http://127.0.0.1:{graphql}/graphql"),
            ops: format!("http://127.0.0.1:{ops}"),
            log,
            checkpoints,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        };
        for args in [&["setup"][..], &["catalog", "seed"], &["inventory", "seed"]] {
            let out = this.command(args).output().expect("run shop");
            assert!(
                out.status.success(),
                "shop {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        this.spawn();
        this.wait_ready(Duration::from_secs(120)).await;
        this
    }

    /// `shop ARGS` with this process's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env_remove("JWT_KEYS_FILE")
            .env_remove("AUDIT_KEYS_FILE")
            .env_remove("MASTER_KEYS_FILE")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Starts `shop run` (again, after a kill), appending to the log file.
    pub fn spawn(&self) {
        let mut slot = self.child.lock().expect("child lock");
        assert!(slot.is_none(), "shop run is already running");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = self
            .command(&["run"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start shop run");
        *slot = Some(child);
    }

    /// Waits until `/readyz` answers 200; panics with the log's tail after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            let exited = self
                .child
                .lock()
                .expect("child lock")
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!("shop run exited with {status}:\n{}", self.log_tail(40));
            }
            let r = self.http.get(format!("{}/readyz", self.ops)).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "shop run not ready after {timeout:?}: {}\n{}",
                self.readyz().await,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The `/readyz` body (or the error reaching it).
    pub async fn readyz(&self) -> Value {
        match self.http.get(format!("{}/readyz", self.ops)).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(e) => json!({ "unreachable": e.to_string() }),
        }
    }

    /// The last `n` lines of the process's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the child.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .lock()
            .expect("child lock")
            .as_ref()
            .expect("shop run is running")
            .id();
        let ok = Command::new("kill")
            // `-s SIG -- PID`: procps-ng 4.0.2 misreads some `-SIG` forms (see browser.rs).
            .args(["-s", signal, "--", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} failed");
    }

    /// SIGKILL, and reap the child.
    pub fn kill(&self) {
        self.signal("KILL");
        if let Some(mut c) = self.child.lock().expect("child lock").take() {
            c.wait().ok();
        }
    }

    /// SIGTERM, then waits for the exit (at most `timeout`) and returns its status.
    pub async fn terminate(&self, timeout: Duration) -> ExitStatus {
        self.signal("TERM");
        let mut child = self
            .child
            .lock()
            .expect("child lock")
            .take()
            .expect("shop run is running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait for shop run") {
                return status;
            }
            if started.elapsed() > timeout {
                child.kill().ok();
                panic!(
                    "shop run did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A bearer token minted by `shop token`, as a user would.
    pub fn token(&self, role: &str, subject: &str) -> String {
        let out = self
            .command(&["token", "--role", role, "--customer-id", subject])
            .output()
            .expect("run shop token");
        assert!(out.status.success(), "shop token failed");
        String::from_utf8(out.stdout)
            .expect("utf-8 token")
            .trim()
            .to_owned()
    }

    /// Places one order, retrying with the same idempotency key while the system answers
    /// 5xx or not at all (a client riding out a restart). Returns its id.
    pub async fn checkout(&self, token: &str, sku: &str, payment_token: &str) -> Uuid {
        let key = Uuid::new_v4().to_string();
        let body = json!({
            "currency": "EUR",
            "items": [{"sku": sku, "quantity": 1}],
            "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Berlin",
                                 "postal_code": "10115", "country": "DE"},
            "payment_token": payment_token,
        });
        let started = Instant::now();
        loop {
            let sent = self
                .http
                .post(format!("{}/orders", self.api))
                .bearer_auth(token)
                .header("Idempotency-Key", &key)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await.expect("checkout answer");
                    return v["order_id"]
                        .as_str()
                        .expect("order_id")
                        .parse()
                        .expect("uuid");
                }
                Ok(r) if r.status().is_client_error() => {
                    panic!(
                        "checkout refused: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )
                }
                _ => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "checkout kept failing for 3 minutes"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A GraphQL query's whole answer, as `token`.
    pub async fn graphql(&self, token: &str, query: &Value) -> Value {
        self.http
            .post(&self.graphql)
            .bearer_auth(token)
            .json(query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Runs `command` to its end (killed, and a panic naming `what`, after 60 s): for a
    /// `shop run` that must refuse to start, a misclassified error would retry for ever.
    pub async fn run_to_exit(mut command: Command, what: &str) -> std::process::Output {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(60) {
                child.kill().ok();
                panic!("{what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        child.wait_with_output().unwrap()
    }

    /// The order's status in GraphQL (`None` until the read side has it).
    pub async fn order_status(&self, token: &str, id: Uuid) -> Option<String> {
        let q = json!({ "query": format!("{{ order(id: \"{id}\") {{ status }} }}") });
        let r = self
            .http
            .post(&self.graphql)
            .bearer_auth(token)
            .json(&q)
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["data"]["order"]["status"].as_str().map(str::to_owned)
    }

    /// The invariant checker's view of this process.
    pub fn system(&self) -> crate::invariants::System {
        let infra = crate::infra();
        crate::invariants::System {
            pool: self.db.pool.clone(),
            kafka_brokers: infra.kafka_brokers,
            topic: format!("{}orders.events", self.prefix),
            graphql_url: self.graphql.clone(),
            operator_token: self.token("operator", "operator"),
            amqp_url: infra.amqp_url,
            queue_prefix: self.prefix.clone(),
            step_attempts: saga::SagaConfig::default().step_attempts,
        }
    }

    /// Deletes the Kafka topics and RabbitMQ queues this process created.
    pub async fn clean_up_brokers(&self) {
        let infra = crate::infra();
        let topics: Vec<String> = ["orders.events", "orders.events.dlq", "user-activity"]
            .iter()
            .map(|t| format!("{}{t}", self.prefix))
            .collect();
        platform::kafka::delete_topics(&infra.kafka_brokers, &topics)
            .await
            .ok();
        let names = saga::topology::Names::new(&self.prefix);
        let queues = names.all_queues(&saga::SagaConfig::default().retry_delays());
        if let Ok(conn) = platform::amqp::connect(&infra.amqp_url, "shop-tests-cleanup").await
            && let Ok(ch) = conn.create_channel().await
        {
            for q in queues {
                ch.queue_delete(q.as_str().into(), Default::default())
                    .await
                    .ok();
            }
        }
    }
}

impl Drop for ShopProcess {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.child.lock()
            && let Some(mut c) = slot.take()
        {
            c.kill().ok();
            c.wait().ok();
        }
    }
}
