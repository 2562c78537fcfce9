//! Reading llm-lb's own counters and gauges back, for the status page: one gathering of the
//! registry, then sums over the series that match a few labels. The status page shows the same
//! numbers as `/metrics` because it reads them from the same place.

use std::collections::BTreeMap;

use pingora_prometheus::prometheus::{self, proto::MetricType};

/// One counter or gauge series.
struct Reading {
    family: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Reading {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn matches(&self, family: &str, filter: &[(&str, &str)]) -> bool {
        self.family == family && filter.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// The value of every counter and gauge series at one moment.
pub struct Readings(Vec<Reading>);

impl Readings {
    /// Gather the registry now (histograms are left out).
    pub fn take() -> Self {
        let mut readings = Vec::new();
        for family in prometheus::gather() {
            let kind = family.get_field_type();
            if !matches!(kind, MetricType::COUNTER | MetricType::GAUGE) {
                continue;
            }
            for m in family.get_metric() {
                let value = if kind == MetricType::COUNTER {
                    m.get_counter().value()
                } else {
                    m.get_gauge().value()
                };
                let labels = m
                    .get_label()
                    .iter()
                    .map(|p| (p.name().to_string(), p.value().to_string()))
                    .collect();
                readings.push(Reading {
                    family: family.name().to_string(),
                    labels,
                    value,
                });
            }
        }
        Readings(readings)
    }

    /// The sum of `family`'s series whose labels include `filter` (`None`: no such series).
    pub fn sum(&self, family: &str, filter: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .filter(|r| r.matches(family, filter))
            .map(|r| r.value)
            .reduce(|a, b| a + b)
    }

    /// [`Readings::sum`] per value of label `by`, among the series that have it.
    pub fn sum_by(&self, family: &str, filter: &[(&str, &str)], by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for r in self.0.iter().filter(|r| r.matches(family, filter)) {
            if let Some(v) = r.label(by) {
                *out.entry(v.to_string()).or_insert(0.0) += r.value;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_series_that_match() {
        super::super::count_request("readings-pool", "a:1", 200);
        super::super::count_request("readings-pool", "a:1", 503);
        super::super::count_request("readings-pool", "b:1", 200);
        let r = Readings::take();
        let pool = [("pool", "readings-pool")];
        assert_eq!(r.sum("llmlb_requests_total", &pool), Some(3.0));
        let by_class = r.sum_by("llmlb_requests_total", &pool, "class");
        assert_eq!(by_class.get("2xx"), Some(&2.0));
        assert_eq!(by_class.get("5xx"), Some(&1.0));
        assert_eq!(
            r.sum(
                "llmlb_requests_total",
                &[("pool", "readings-pool"), ("endpoint", "b:1")]
            ),
            Some(1.0)
        );
        assert_eq!(r.sum("llmlb_requests_total", &[("pool", "none")]), None);
    }
}
