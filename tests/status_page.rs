//! The admin status page (`GET /`) in a real browser — Debian's Chromium, driven over WebDriver by
//! chromedriver — and its JSON (`GET /status`): the page renders every endpoint as healthy, shows
//! an endpoint ejected after a fault and a rejected reload without being reloaded itself, and its
//! screenshot is saved (`LLMLB_SCREENSHOT_DIR`, else `target/`) for README.
//!
//! Needs `chromium` and `chromedriver` (`scripts/test.sh` installs them); fails, never skips,
//! without them.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use vllm_sim::SimConfig;

/// chromedriver on a free loopback port, and a WebDriver session of headless Chromium.
struct Browser {
    client: Client,
    driver: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver; scripts/test.sh installs it)");
        let profile = tempfile::tempdir().expect("profile dir");
        // The flags keep Chromium off the network: this machine reaches nothing outside.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1360,900",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": "/usr/bin/chromium", "args": args}),
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut last = String::new();
        for _ in 0..100 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => {
                    return Browser {
                        client,
                        driver,
                        profile,
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no WebDriver session from chromedriver on {url}: {last}");
    }

    /// Evaluate `script` (a function body) in the page.
    async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// The `data-state` of each endpoint row of pool `pool`, in the page's order.
    async fn states(&self, pool: &str) -> Value {
        self.eval(&format!(
            "return [...document.querySelectorAll('section[data-pool=\"{pool}\"] tr[data-endpoint]')]\
             .map(r => [r.dataset.endpoint, r.dataset.state]);"
        ))
        .await
    }
}

impl Drop for Browser {
    /// Kill chromedriver, then the Chromium it started (which killing the driver leaves behind,
    /// orphaned): every process whose command line names this browser's own profile directory.
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let profile = format!("--user-data-dir={}", self.profile.path().display());
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", "--", &profile])
            .status();
    }
}

async fn status(proxy: &Proxy) -> Value {
    reqwest::get(format!("http://{}/status", proxy.admin))
        .await
        .expect("GET /status")
        .json()
        .await
        .expect("status JSON")
}

fn expected(addrs: &[SocketAddr], state_of: impl Fn(usize) -> &'static str) -> Value {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| json!([a.to_string(), state_of(i)]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_health_ejection_and_reloads_live() {
    let sims = sim_fleet(
        3,
        SimConfig {
            model: "m".into(),
            time_scale: 0.0,
            ..SimConfig::default()
        },
    )
    .await;
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr()).collect();
    // A second pool whose policy scrapes its engines' metrics.
    let scraped = sim_fleet(
        2,
        SimConfig {
            model: "b".into(),
            time_scale: 0.0,
            ..SimConfig::default()
        },
    )
    .await;
    let scraped: Vec<SocketAddr> = scraped.iter().map(|s| s.addr()).collect();
    let policy = format!(
        "pools:\n{}{}",
        pool_yaml(
            "chat",
            "[m]",
            &addrs,
            "prefix_cache",
            "    health_check: {enabled: false}\n    outlier_detection: {consecutive_failures: 2, base_ejection_ms: 600000}\n",
        ),
        pool_yaml(
            "batch",
            "[b]",
            &scraped,
            "least_busy",
            "    metrics: {interval_ms: 200}\n"
        )
    );
    let proxy = Proxy::start(&policy);
    let client = reqwest::Client::new();
    // Conversations 0-3, each asked again: the engines' prefix caches serve the repeats.
    // Conversation `c`: a new one is placed by least request (ties at random), a known one goes
    // back where it went.
    let chat = async |c: usize| {
        let body = json!({"model": "m", "max_tokens": 4,
            "messages": [{"role": "user", "content": format!("conversation {c}: tell me something")}]});
        let resp = client
            .post(proxy.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .expect("chat");
        resp.status().as_u16()
    };
    for i in 0..8 {
        assert_eq!(chat(i % 4).await, 200, "chat {i}");
    }
    let body = json!({"model": "b", "max_tokens": 4, "prompt": "a batch job"});
    let resp = client
        .post(proxy.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("completion");
    assert_eq!(resp.status(), 200);

    // The JSON first: what scripts read.
    let s = status(&proxy).await;
    assert_eq!(s["generation"]["id"], 1);
    assert_eq!(s["last_reload"], Value::Null);
    let pool = &s["pools"][0];
    assert_eq!(pool["name"], "chat");
    assert_eq!(pool["policy"], "prefix_cache");
    assert_eq!(pool["store"]["kind"], "embedded");
    assert_eq!(pool["requests"]["2xx"], 8);
    let picks: u64 = pool["picks"]
        .as_object()
        .expect("picks")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(picks, 8, "{pool}");
    assert!(pool["tokens"]["prompt"].as_u64() > Some(0), "{pool}");
    assert!(pool["tokens"]["cached"].as_u64() > Some(0), "{pool}");
    assert_eq!(pool["picks"]["prefix_hit"], 4, "{pool}");
    for e in pool["endpoints"].as_array().expect("endpoints") {
        assert_eq!(e["state"], "healthy", "{e}");
        assert_eq!(e["inflight"], 0, "{e}");
        assert_eq!(e["engine"], Value::Null, "prefix_cache scrapes no metrics");
    }
    eventually(
        "the batch pool's engine metrics",
        Duration::from_secs(20),
        async || {
            let s = status(&proxy).await;
            let batch = &s["pools"][1];
            match batch["endpoints"].as_array() {
                Some(eps) if eps.iter().all(|e| e["engine"]["stale"] == false) => Ok(()),
                _ => Err(format!("{batch}")),
            }
        },
    )
    .await;

    // The page, in a real browser.
    let browser = Browser::start().await;
    let page = format!("http://{}/", proxy.admin);
    browser.client.goto(&page).await.expect("open the page");
    let all_healthy = expected(&addrs, |_| "healthy");
    eventually(
        "the page shows three healthy endpoints",
        Duration::from_secs(20),
        async || match browser.states("chat").await {
            v if v == all_healthy => Ok(()),
            v => Err(format!("{v}")),
        },
    )
    .await;
    let text = browser.eval("return document.body.innerText;").await;
    let text = text.as_str().unwrap_or_default();
    for want in [
        "llm-lb",
        "chat",
        "prefix_cache",
        "embedded",
        "picks by reason",
    ] {
        assert!(text.contains(want), "page text lacks {want:?}:\n{text}");
    }
    // Marks this page load: a navigation would lose it.
    browser.eval("window.sameLoad = true; return null;").await;

    // A fault: the third engine answers every completion with 503 (relayed to the client: the
    // engine may have started); after two failures in a row it is ejected. New conversations,
    // so that some are placed there (the four above may all sit on the other two).
    sims[2].faults().set_fail(1.0, 503).expect("fault");
    let victim = addrs[2].to_string();
    for i in 100..160 {
        let _ = chat(i).await;
        let s = status(&proxy).await;
        if s["pools"][0]["endpoints"][2]["state"] == "ejected" {
            break;
        }
    }
    let s = status(&proxy).await;
    let ejected = &s["pools"][0]["endpoints"][2];
    assert_eq!(ejected["address"], victim.as_str());
    assert_eq!(ejected["state"], "ejected", "{s}");
    assert!(
        ejected["ejected_for_seconds"].as_f64() > Some(1.0),
        "{ejected}"
    );
    assert!(ejected["requests"]["5xx"].as_u64() >= Some(2), "{ejected}");

    let after_fault = expected(&addrs, |i| if i == 2 { "ejected" } else { "healthy" });
    eventually(
        "the page shows the ejection",
        Duration::from_secs(20),
        async || match browser.states("chat").await {
            v if v == after_fault => Ok(()),
            v => Err(format!("{v}")),
        },
    )
    .await;

    // A rejected reload: the verdict reaches the page, the generation stays.
    std::fs::write(proxy.policy_path(), "pools: [oops\n").expect("break the policy file");
    let resp = client
        .post(format!("http://{}/-/reload", proxy.admin))
        .send()
        .await
        .expect("reload");
    assert_eq!(resp.status(), 400);
    let s = status(&proxy).await;
    assert_eq!(s["last_reload"]["result"], "invalid", "{s}");
    assert_eq!(s["last_reload"]["trigger"], "admin", "{s}");
    assert_eq!(s["generation"]["id"], 1);
    eventually("the page shows the rejected reload", Duration::from_secs(20), async || {
        let banner = browser
            .eval("const b = document.getElementById('banner'); return b.hidden ? '' : b.innerText;")
            .await;
        match banner.as_str() {
            Some(b) if b.contains("invalid") => Ok(()),
            other => Err(format!("banner {other:?}")),
        }
    })
    .await;
    assert_eq!(
        browser.eval("return window.sameLoad === true;").await,
        true,
        "the page updated itself without being reloaded"
    );

    let png = browser.client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let dir = std::env::var_os("LLMLB_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::write(dir.join("status-page.png"), png).expect("save the screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_answers_unknown_paths_with_the_list_of_routes() {
    let proxy = Proxy::start("pools:\n  - name: p\n    models: ['*']\n    endpoints: ['127.0.0.1:9']\n    lb_policy: round_robin\n");
    let resp = reqwest::get(format!("http://{}/nope", proxy.admin))
        .await
        .expect("get");
    assert_eq!(resp.status(), 404);
    let text = resp.text().await.expect("text");
    assert!(
        text.contains("GET /status") && text.contains("GET / "),
        "{text}"
    );
    let page = reqwest::get(format!("http://{}/", proxy.admin))
        .await
        .expect("get /");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/html")));
    let html = page.text().await.expect("html");
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("src="),
        "the page loads nothing from elsewhere"
    );
}
