//! A real headless browser for tests of the operator console: Debian's Chromium driven over
//! WebDriver by its `chromedriver` (both installed by `scripts/deps.sh`), one driver process
//! per test on a free loopback port, killed when the test ends.
//!
//! Screenshots are written to `$CONSOLE_SCREENSHOTS` when it is set
//! (`scripts/console-screenshots.sh` regenerates the PNGs in docs/operations.md).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use std::os::unix::process::CommandExt;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// A headless Chromium session and the chromedriver behind it.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

fn chromedriver() -> PathBuf {
    for candidate in ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"] {
        let p = PathBuf::from(candidate);
        if p.exists() {
            return p;
        }
    }
    panic!("chromedriver is not installed: run scripts/deps.sh (Debian's chromium-driver)")
}

impl Browser {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // Its own process group: the Chromium it starts goes with it (see `stop_driver`).
        let driver = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if http
                .get(format!("{url}/status"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1440,1000",
                         "--no-first-run", "--disable-extensions",
                         // Nothing leaves the machine: this network is closed, and a
                         // browser that calls home (updates, sync, safe browsing, DNS
                         // probes) sent hundreds of lookups per test to the resolver.
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-quic", "--disable-default-apps",
                         "--disable-domain-reliability", "--no-pings",
                         "--disable-client-side-phishing-detection", "--disable-breakpad",
                         "--metrics-recording-only",
                         "--disable-features=Translate,OptimizationHints,MediaRouter,AsyncDns,DnsOverHttps,NetworkTimeServiceQuerying,AutofillServerCommunication,CertificateTransparencyComponentUpdater",
                         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a chromium session");
        Self { client, driver }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    /// The first element matching `css` (a test failure when there is none).
    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` on the page: {e}"))
    }

    /// The visible text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("element text")
    }

    /// The page's whole visible text.
    pub async fn body(&self) -> String {
        self.text("body").await
    }

    /// Clicks what leads to another page (a link, a form's button) and waits until the
    /// browser left the current one: a click does not wait for the navigation it starts.
    pub async fn click(&self, css: &str) {
        let old = self.find("html").await;
        self.find(css).await.click().await.expect("click");
        for _ in 0..300 {
            // The old document's root goes stale once the new page replaced it.
            if old.tag_name().await.is_err() {
                self.client
                    .wait()
                    .for_element(Locator::Css("body"))
                    .await
                    .expect("the next page");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("clicking `{css}` led nowhere within 15 s");
    }

    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        e.clear().await.expect("clear");
        e.send_keys(text).await.expect("type");
    }

    /// Saves a screenshot as `<name>.png` under `$CONSOLE_SCREENSHOTS` (when set).
    pub async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("CONSOLE_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(PathBuf::from(dir).join(format!("{name}.png")), png).expect("write png");
    }

    pub async fn close(self) {
        self.client.clone().close().await.ok();
    }
}

/// Kills chromedriver and every Chromium process it started (its process group): killing
/// the driver alone leaves the browser running.
///
/// The signal is given with `-s` and the group after `--`: Debian 12's `kill` (procps-ng
/// 4.0.2) reads `kill -KILL -<pgid>` as `kill(-1, SIGKILL)`, every process of the machine.
/// That took down CI's whole run (exit -1) and every service with it.
fn stop_driver(driver: &mut Child) {
    Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", driver.id())])
        .status()
        .ok();
    driver.kill().ok();
    driver.wait().ok();
}

impl Drop for Browser {
    fn drop(&mut self) {
        stop_driver(&mut self.driver);
    }
}
