//! The background service that scrapes one pool's endpoints.
//!
//! One loop per endpoint, so a slow or hung endpoint never delays the others (nor requests, which
//! only read the board). Each loop GETs `metrics.path` every `metrics.interval_ms` over a pooled
//! keep-alive connection, gives up after [`scrape_timeout`], and publishes what it read. A failure
//! (connect error, timeout, non-200, body over [`MAX_BODY_BYTES`], unusable exposition) leaves the
//! previous snapshot in place to age out; it is counted in
//! `llmlb_scrape_failures_total{reason}`, and the moment an endpoint's metrics become unknown (or
//! known again) is logged. `llmlb_scrape_age_seconds` and `llmlb_endpoint_metrics_known` are
//! updated after every attempt, `llmlb_engine_waiting` and `llmlb_engine_kv_cache_usage` after
//! every successful one. The loops stop on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{parse_with, EndpointMetrics, MetricsBoard, ParseError};
use crate::config::MetricsConfig;
use crate::telemetry;

/// The longest a scrape may take, whatever the interval.
pub(crate) const MAX_SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// A scrape may always take this long, however short the interval.
pub const MIN_SCRAPE_TIMEOUT: Duration = Duration::from_millis(50);
/// Largest `/metrics` body read (vLLM with many LoRA series and histograms stays far below).
pub(crate) const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Idle pooled connections are closed after this (below uvicorn's 5 s keep-alive).
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// A scrape gives up after the interval, within [`MIN_SCRAPE_TIMEOUT`]–`MAX_SCRAPE_TIMEOUT`.
/// Scrapes of one endpoint never overlap (the next waits for the previous), so a hung endpoint
/// costs its own loop one timeout per attempt and nothing else.
pub fn scrape_timeout(interval: Duration) -> Duration {
    interval.clamp(MIN_SCRAPE_TIMEOUT, MAX_SCRAPE_TIMEOUT)
}

/// Why one scrape produced nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScrapeError {
    #[error("timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("HTTP error: {0}")]
    Http(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("body over {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    Parse(#[from] ParseError),
}

impl ScrapeError {
    /// The bounded `reason` label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ScrapeError::Timeout => "timeout",
            ScrapeError::Connect(_) => "connect",
            ScrapeError::Http(_) => "http",
            ScrapeError::Status(_) => "status",
            ScrapeError::TooLarge => "too_large",
            ScrapeError::Parse(ParseError::Missing(_)) => "missing_metrics",
            ScrapeError::Parse(_) => "parse",
        }
    }
}

impl From<reqwest::Error> for ScrapeError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            ScrapeError::Timeout
        } else if e.is_connect() {
            ScrapeError::Connect(e.to_string())
        } else {
            ScrapeError::Http(e.to_string())
        }
    }
}

/// Scrapes one pool's endpoints into its [`MetricsBoard`]; see the module docs.
pub struct ScrapeService {
    board: Arc<MetricsBoard>,
    path: String,
}

impl ScrapeService {
    /// Scrape `config.path` of the endpoints on `board`, every interval the board was made with.
    pub fn new(board: Arc<MetricsBoard>, config: &MetricsConfig) -> Self {
        ScrapeService {
            board,
            path: config.path.clone(),
        }
    }
}

#[async_trait]
impl BackgroundService for ScrapeService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let timeout = scrape_timeout(self.board.interval());
        let client = match reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(1)
            .user_agent("llm-lb-scraper")
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                log::error!(
                    "pool {}: cannot build the metrics client, engine metrics stay unknown: {e}",
                    self.board.pool()
                );
                return;
            }
        };
        log::info!(
            "pool {}: scraping {} of {} endpoints every {} ms (timeout {} ms)",
            self.board.pool(),
            self.path,
            self.board.len(),
            self.board.interval().as_millis(),
            timeout.as_millis()
        );
        let loops: Vec<_> = (0..self.board.len())
            .map(|i| {
                let scraper = Scraper {
                    board: self.board.clone(),
                    endpoint: i,
                    url: format!("http://{}{}", self.board.label(i), self.path),
                    client: client.clone(),
                    timeout,
                };
                tokio::spawn(scraper.run(shutdown.clone()))
            })
            .collect();
        for l in loops {
            if let Err(e) = l.await {
                log::error!("pool {}: a metrics loop failed: {e}", self.board.pool());
            }
        }
    }
}

/// The loop of one endpoint.
struct Scraper {
    board: Arc<MetricsBoard>,
    endpoint: usize,
    url: String,
    client: reqwest::Client,
    timeout: Duration,
}

impl Scraper {
    async fn run(self, mut shutdown: ShutdownWatch) {
        let pool = self.board.pool().to_string();
        let label = self.board.label(self.endpoint).to_string();
        let mut every = tokio::time::interval(self.board.interval());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_known: Option<bool> = None;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.changed() => break,
            }
            let before = self.board.dispatched(self.endpoint);
            let sent = Instant::now();
            let outcome = match tokio::time::timeout(self.timeout, self.fetch()).await {
                Ok(r) => r,
                Err(_) => Err(ScrapeError::Timeout),
            };
            let failure = match outcome {
                Ok(metrics) => {
                    log::trace!("pool {pool}: {label}: {metrics:?}");
                    telemetry::set_engine_load(
                        &pool,
                        &label,
                        metrics.waiting,
                        metrics.kv_cache_usage,
                    );
                    self.board.publish(self.endpoint, metrics, sent, before);
                    None
                }
                Err(e) => {
                    log::debug!("pool {pool}: scraping {} failed: {e}", self.url);
                    telemetry::count_scrape_failure(&pool, &label, e.reason());
                    Some(e)
                }
            };
            let age = self.board.age(self.endpoint, Instant::now());
            let known = age.is_some_and(|a| a <= self.board.stale_after());
            telemetry::set_scrape_age(
                &pool,
                &label,
                age.map_or(f64::INFINITY, |a| a.as_secs_f64()),
            );
            telemetry::set_metrics_known(&pool, &label, known);
            if was_known != Some(known) {
                match (known, &failure) {
                    (false, Some(e)) => log::warn!(
                        "pool {pool}: engine metrics of {label} unknown ({e}); it is compared on in-flight counts until a scrape succeeds"
                    ),
                    (false, None) => {}
                    (true, _) if was_known.is_some() => {
                        log::info!("pool {pool}: engine metrics of {label} known again")
                    }
                    (true, _) => {}
                }
                was_known = Some(known);
            }
        }
    }

    async fn fetch(&self) -> Result<EndpointMetrics, ScrapeError> {
        let mut resp = self.client.get(&self.url).send().await?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(ScrapeError::Status(status));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(ScrapeError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ScrapeError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(parse_with(
            &String::from_utf8_lossy(&body),
            self.board.target(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_is_the_interval_within_bounds() {
        assert_eq!(
            scrape_timeout(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        assert_eq!(scrape_timeout(Duration::from_secs(5)), MAX_SCRAPE_TIMEOUT);
        assert_eq!(scrape_timeout(Duration::from_millis(5)), MIN_SCRAPE_TIMEOUT);
    }

    #[test]
    fn reasons_are_bounded_labels() {
        assert_eq!(ScrapeError::Timeout.reason(), "timeout");
        assert_eq!(ScrapeError::Status(503).reason(), "status");
        assert_eq!(
            ScrapeError::Parse(ParseError::Missing("waiting-queue")).reason(),
            "missing_metrics"
        );
        assert_eq!(
            ScrapeError::Parse(ParseError::Syntax("x".into())).reason(),
            "parse"
        );
    }
}
