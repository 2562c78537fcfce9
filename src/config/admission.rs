//! The waiting room of a pool (`admission`): how many requests this replica lets in flight per
//! endpoint, the priority bands a request falls into (critical, standard, sheddable), how many
//! may wait in each and for how long.

use std::time::Duration;

use super::file::{AdmissionFile, BandFile};
use super::InvalidKey;

/// A priority band, most important first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Band {
    /// Never refused with 429 (503 when its own queue or deadline is exceeded).
    Critical,
    /// The default.
    Standard,
    /// Waits least and is refused first.
    Sheddable,
}

impl Band {
    /// Every band, most important first.
    pub const ALL: [Band; 3] = [Band::Critical, Band::Standard, Band::Sheddable];

    /// The band's name in headers, configuration and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Band::Critical => "critical",
            Band::Standard => "standard",
            Band::Sheddable => "sheddable",
        }
    }

    /// The band named `name` (case-insensitive).
    pub fn parse(name: &str) -> Option<Band> {
        Band::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Position in [`Band::ALL`].
    pub fn index(self) -> usize {
        match self {
            Band::Critical => 0,
            Band::Standard => 1,
            Band::Sheddable => 2,
        }
    }
}

/// How many requests of a band may wait, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandLimits {
    /// Most requests of the band waiting at once; more are refused at once.
    pub queue: usize,
    /// Longest wait; then the request is refused.
    pub deadline: Duration,
}

/// A pool's waiting room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Requests this replica lets in flight per healthy endpoint before new ones wait.
    pub max_inflight: usize,
    /// Header naming a request's band (`critical`, `standard`, `sheddable`), lower case.
    pub priority_header: String,
    /// Header naming a request's tenant, lower case; without it, a hash of the API key.
    pub tenant_header: String,
    /// The band of a request that names none (and whose model is not critical).
    pub default_band: Band,
    /// Models whose requests are critical (the pool's `criticalModels`).
    pub critical_models: Vec<String>,
    /// Per band, in [`Band::ALL`] order.
    pub bands: [BandLimits; 3],
}

/// Defaults per band: queue, deadline in ms.
const DEFAULT_LIMITS: [(usize, u64); 3] = [(1024, 60_000), (256, 20_000), (64, 5_000)];

impl AdmissionConfig {
    /// The settings of `file` (`None`, or `enabled: false`: no waiting room), with the pool's
    /// `criticalModels`.
    pub fn from_file(
        file: Option<&AdmissionFile>,
        critical_models: Vec<String>,
    ) -> Result<Option<Self>, Vec<InvalidKey>> {
        let Some(f) = file else {
            return Ok(None);
        };
        if f.enabled == Some(false) {
            return Ok(None);
        }
        let mut bad = Vec::new();
        let max_inflight = match f.max_inflight {
            Some(n) if (1..=100_000).contains(&n) => n,
            Some(_) => {
                bad.push(InvalidKey::new("max_inflight", "must be 1 to 100000"));
                1
            }
            None => {
                bad.push(InvalidKey::new(
                    "max_inflight",
                    "required: requests this replica lets in flight per endpoint before new ones wait",
                ));
                1
            }
        };
        let mut header = |key: &'static str, value: &Option<String>, default: &str| {
            let name = value.as_deref().unwrap_or(default);
            match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => h.as_str().to_owned(),
                Err(_) => {
                    bad.push(InvalidKey::new(
                        key,
                        format!("'{name}' is not a header name"),
                    ));
                    String::new()
                }
            }
        };
        let priority_header = header("priority_header", &f.priority_header, "x-llm-lb-priority");
        let tenant_header = header("tenant_header", &f.tenant_header, "x-tenant-id");
        let default_band = match f.default_band.as_deref() {
            None => Band::Standard,
            Some(name) => Band::parse(name).unwrap_or_else(|| {
                bad.push(InvalidKey::new(
                    "default_band",
                    format!("'{name}' is not one of critical, standard, sheddable"),
                ));
                Band::Standard
            }),
        };
        let files = f.bands.as_ref();
        let bands = Band::ALL.map(|band| {
            let (queue, deadline_ms) = DEFAULT_LIMITS[band.index()];
            let file: Option<&BandFile> = files.and_then(|b| match band {
                Band::Critical => b.critical.as_ref(),
                Band::Standard => b.standard.as_ref(),
                Band::Sheddable => b.sheddable.as_ref(),
            });
            let queue = file.and_then(|b| b.queue).unwrap_or(queue);
            let deadline_ms = file.and_then(|b| b.deadline_ms).unwrap_or(deadline_ms);
            if queue > 1_000_000 {
                bad.push(InvalidKey::new(
                    "bands",
                    format!("{}.queue: at most 1000000", band.name()),
                ));
            }
            if !(1..=3_600_000).contains(&deadline_ms) {
                bad.push(InvalidKey::new(
                    "bands",
                    format!("{}.deadline_ms: 1 to 3600000", band.name()),
                ));
            }
            BandLimits {
                queue,
                deadline: Duration::from_millis(deadline_ms),
            }
        });
        if !bad.is_empty() {
            return Err(bad);
        }
        Ok(Some(AdmissionConfig {
            max_inflight,
            priority_header,
            tenant_header,
            default_band,
            critical_models,
            bands,
        }))
    }

    /// The band of a request for `model` whose priority header says `named`: the header wins,
    /// then `criticalModels`, then the default band.
    pub fn band_of(&self, named: Option<&str>, model: Option<&str>) -> Band {
        if let Some(band) = named.and_then(Band::parse) {
            return band;
        }
        match model {
            Some(m) if self.critical_models.iter().any(|c| c == m) => Band::Critical,
            _ => self.default_band,
        }
    }
}
