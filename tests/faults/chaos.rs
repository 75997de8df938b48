//! Faults under load, against the real services: each test starts `shop run` as a child
//! process, keeps checkouts in flight, does something bad to one real service process, and
//! then checks every whole-system invariant ([`shop_tests::invariants`]) with no manual step.
//!
//! These tests stop shared services, so they live in their own test binary (cargo runs test
//! binaries one after another) and take one lock each, so they run one at a time. Every
//! fault is undone by a guard, also when a test fails, so later binaries find the services
//! up. `scripts/chaos.sh` runs the long version.

use std::{
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use shop_tests::{invariants, process::ShopProcess};
use uuid::Uuid;

/// Orders per test (CHAOS_ORDERS, default 240): enough that faults land while many are in
/// flight; `scripts/chaos.sh` runs thousands.
fn orders() -> usize {
    std::env::var("CHAOS_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(240)
}
/// Concurrent clients.
const CLIENTS: usize = 12;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shop"))
}

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd)
        .args(args)
        .status()
        .expect("run a command");
    assert!(status.success(), "{cmd} {args:?} failed");
}

/// For undoing a fault from a guard: a failure is reported, never a panic (a panic while
/// a failed test unwinds would abort and hide the original failure).
fn run_quietly(cmd: &str, args: &[&str]) {
    match Command::new(cmd).args(args).status() {
        Ok(s) if s.success() => {}
        other => eprintln!("undoing a fault: {cmd} {args:?} failed: {other:?}"),
    }
}

/// The broker's pid: from `scripts/kafka.sh`'s pid file, or the one `kafka.Kafka` process
/// running (a broker started by another checkout's scripts).
fn kafka_pid() -> String {
    if let Ok(pid) = std::fs::read_to_string(root().join(".local/kafka/kafka.pid"))
        && Command::new("kill")
            .args(["-s", "0", "--", pid.trim()])
            .status()
            .is_ok_and(|s| s.success())
    {
        return pid.trim().to_owned();
    }
    let out = Command::new("pgrep")
        .args(["-f", "kafka.Kafka"])
        .output()
        .expect("pgrep");
    let pids = String::from_utf8_lossy(&out.stdout);
    let mut pids = pids.split_whitespace();
    match (pids.next(), pids.next()) {
        (Some(pid), None) => pid.to_owned(),
        other => panic!("cannot tell which process is the Kafka broker: {other:?}"),
    }
}

/// Undoes a fault when dropped (a failed test must not leave a service down).
struct Undo(Option<Box<dyn FnOnce()>>);

impl Undo {
    fn new(f: impl FnOnce() + 'static) -> Self {
        Self(Some(Box::new(f)))
    }
    fn now(mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}

fn kafka_up() {
    run_quietly(
        "bash",
        &[root().join("scripts/kafka.sh").to_str().unwrap(), "up"],
    );
}

fn postgres_cluster() -> (String, String) {
    let out = Command::new("pg_lsclusters")
        .arg("--no-header")
        .output()
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    let mut f = line.split_whitespace();
    (f.next().unwrap().to_owned(), f.next().unwrap().to_owned())
}

/// Places `orders()` checkouts from `CLIENTS` concurrent clients (one in ten declined);
/// `fault` runs once a third of them are placed, while the rest keep coming.
async fn under_load(
    shop: Arc<ShopProcess>,
    fault: impl AsyncFnOnce(Arc<ShopProcess>),
) -> Vec<Uuid> {
    let token = Arc::new(shop.token("customer", "c-chaos"));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let placed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (shop, token, next, placed) =
            (shop.clone(), token.clone(), next.clone(), placed.clone());
        clients.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= orders() {
                    return;
                }
                let payment = if i % 10 == 9 {
                    "tok_decline"
                } else {
                    "tok_visa"
                };
                let id = shop
                    .checkout(&token, &format!("SKU-{}", i % 5 + 1), payment)
                    .await;
                placed.lock().unwrap().push(id);
            }
        });
    }
    while placed.lock().unwrap().len() < orders() / 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fault(shop.clone()).await;
    while let Some(r) = clients.join_next().await {
        r.expect("client task");
    }
    let ids = placed.lock().unwrap().clone();
    assert_eq!(ids.len(), orders());
    ids
}

/// Waits for every order to settle, checks every invariant, then checks readiness and a
/// clean stop.
async fn settles(shop: ShopProcess, orders: &[Uuid], fault: &str, started: Instant) {
    let sys = shop.system();
    let timeout = Duration::from_secs(240.max(orders.len() as u64 / 5));
    let report = invariants::wait_settled(&sys, orders, timeout).await;
    eprintln!(
        "chaos: {fault}|{}|{}|{}|{}|{:.1?}",
        orders.len(),
        report.confirmed,
        report.cancelled,
        report.violations.len(),
        started.elapsed()
    );
    eprintln!("{fault}: {report}");
    if !report.is_ok() {
        eprintln!("{}", shop.log_tail(60));
    }
    report.assert_ok();
    assert_eq!(
        report.confirmed + report.cancelled,
        orders.len(),
        "{report}"
    );
    shop.wait_ready(Duration::from_secs(120)).await;
    let status = shop.terminate(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "{fault}: exit {status}\n{}",
        shop.log_tail(30)
    );
    shop.clean_up_brokers().await;
}

/// One fault scenario: a fresh `shop run`, the load, `fault` once a third is placed, then
/// every invariant.
async fn scenario(name: &str, fault: impl AsyncFnOnce(Arc<ShopProcess>)) {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let shop = Arc::new(ShopProcess::start(bin()).await);
    let started = Instant::now();
    let orders = under_load(shop.clone(), fault).await;
    let shop = Arc::into_inner(shop).expect("clients done");
    settles(shop, &orders, name, started).await;
}

#[tokio::test]
async fn kafka_broker_killed_and_restarted_under_load() {
    scenario("kafka SIGKILL", async |shop: Arc<ShopProcess>| {
        run("kill", &["-KILL", &kafka_pid()]);
        let undo = Undo::new(kafka_up);
        // The projectors notice and show as restarting; nothing ends silently.
        let mut seen = serde_json::Value::Null;
        for _ in 0..120 {
            seen = shop.readyz().await;
            if seen["roles"]["projector:order_summary"] == "restarting" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(
            seen["roles"]["projector:order_summary"], "restarting",
            "{seen}"
        );
        // Past the readiness grace (10 s) the process says it is degraded.
        for _ in 0..120 {
            seen = shop.readyz().await;
            if seen["ready"] == false {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(seen["status"], "degraded", "{seen}");
        undo.now();
    })
    .await;
}

#[tokio::test]
async fn rabbitmq_stopped_and_started_under_load() {
    scenario("rabbitmq stop/start", async |_| {
        run("rabbitmqctl", &["-q", "stop_app"]);
        let undo = Undo::new(|| run_quietly("rabbitmqctl", &["-q", "start_app"]));
        tokio::time::sleep(Duration::from_secs(8)).await;
        undo.now();
    })
    .await;
}

#[tokio::test]
async fn postgres_restarted_under_load() {
    scenario("postgres restart", async |_| {
        let (version, name) = postgres_cluster();
        // If the restart fails half way, the server must not stay down for later tests.
        let (v, n) = (version.clone(), name.clone());
        let _start = Undo::new(move || {
            run_quietly(
                "pg_ctlcluster",
                &["--skip-systemctl-redirect", &v, &n, "start"],
            )
        });
        run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &version,
                &name,
                "restart",
                "-m",
                "fast",
            ],
        );
    })
    .await;
}

#[tokio::test]
async fn shop_killed_and_restarted_under_load() {
    scenario("shop SIGKILL", async |shop: Arc<ShopProcess>| {
        // Clients keep retrying with their idempotency keys while nothing listens.
        shop.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        shop.spawn();
        shop.wait_ready(Duration::from_secs(120)).await;
    })
    .await;
}

#[tokio::test]
async fn kafka_broker_stalled_under_load() {
    scenario("kafka SIGSTOP 20 s", async |_| {
        let pid = kafka_pid();
        run("kill", &["-STOP", &pid]);
        let undo = Undo::new(move || run_quietly("kill", &["-CONT", &pid]));
        tokio::time::sleep(Duration::from_secs(20)).await;
        undo.now();
    })
    .await;
}
