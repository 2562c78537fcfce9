//! How an attempt went, for passive health: what the proxy observed ([`Observed`]) and the
//! [`Verdict`] it amounts to (see [`super::passive`] for what counts as a failure).

use crate::endpoint::Outcome;

/// Why an attempt counts against its endpoint (the `reason` label of ejections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connect refused, unreachable or timed out.
    Connect,
    /// The upstream did not answer (or accept the request) within its timeout.
    Timeout,
    /// The upstream closed or reset the connection, or broke the protocol.
    Reset,
    /// The upstream answered 500, 502, 503 or 504.
    Status(u16),
}

impl Failure {
    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Reset => "reset",
            Failure::Status(_) => "5xx",
        }
    }

    /// The upstream failure an error reports, if it is one (errors of the client or of llm-lb
    /// itself are not the endpoint's fault).
    // Foreign enum (pingora's ErrorType): every other upstream error counts as a reset.
    #[allow(clippy::wildcard_enum_match_arm)]
    pub fn of_error(e: &pingora::Error) -> Option<Failure> {
        use pingora::{ErrorSource, ErrorType};
        if *e.esource() != ErrorSource::Upstream {
            return None;
        }
        Some(match e.etype() {
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::BindError
            | ErrorType::SocketError
            | ErrorType::ConnectProxyFailure
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout => Failure::Connect,
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
            ErrorType::HTTPStatus(code) => Failure::Status(*code),
            _ => Failure::Reset,
        })
    }
}

/// Whether an upstream status counts as a failure of the endpoint.
pub fn is_failure_status(status: u16) -> bool {
    matches!(status, 500 | 502 | 503 | 504)
}

/// How an attempt ended, for its endpoint's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The endpoint answered and the attempt completed: it ends a failure streak.
    Success,
    /// The endpoint failed the attempt.
    Failure(Failure),
    /// Not the endpoint's doing either way (e.g. the client left); ignored.
    Neutral,
}

/// What one upstream attempt observed, turned into a [`Verdict`] when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct Observed {
    /// Status of the upstream's (final) response header.
    status: Option<u16>,
    /// The first upstream failure seen.
    failure: Option<Failure>,
}

impl Observed {
    /// The upstream answered with `status` (informational 1xx answers are ignored).
    pub fn status(&mut self, status: u16) {
        if status >= 200 {
            self.status = Some(status);
        }
    }

    /// Whether the upstream answered with a (final) response header.
    pub fn answered(&self) -> bool {
        self.status.is_some()
    }

    /// Whether the upstream answered with a 2xx response header.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// An error happened during the attempt.
    pub fn error(&mut self, e: &pingora::Error) {
        if self.failure.is_none() {
            self.failure = Failure::of_error(e);
        }
    }

    /// The verdict for an attempt that ended with `outcome`.
    pub fn verdict(&self, outcome: Outcome) -> Verdict {
        if let Some(s) = self.status.filter(|s| is_failure_status(*s)) {
            return Verdict::Failure(Failure::Status(s));
        }
        if let Some(f) = self.failure {
            return Verdict::Failure(f);
        }
        match (outcome, self.status) {
            (Outcome::Completed, Some(_)) => Verdict::Success,
            // A failure without an upstream error (llm-lb's own), a client gone, a dropped context.
            _ => Verdict::Neutral,
        }
    }
}

pub(super) fn failure_text(f: Failure) -> String {
    match f {
        Failure::Status(s) => format!("status {s}"),
        other @ (Failure::Connect | Failure::Timeout | Failure::Reset) => other.label().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let ok = |status: u16, outcome| {
            let mut o = Observed::default();
            o.status(status);
            o.verdict(outcome)
        };
        assert_eq!(ok(200, Outcome::Completed), Verdict::Success);
        assert_eq!(ok(404, Outcome::Completed), Verdict::Success);
        assert_eq!(ok(429, Outcome::Completed), Verdict::Success);
        assert_eq!(ok(400, Outcome::Failed), Verdict::Neutral);
        assert_eq!(ok(501, Outcome::Completed), Verdict::Success);
        for s in [500, 502, 503, 504] {
            assert_eq!(
                ok(s, Outcome::Completed),
                Verdict::Failure(Failure::Status(s))
            );
            assert_eq!(
                ok(s, Outcome::Aborted),
                Verdict::Failure(Failure::Status(s))
            );
        }
        assert_eq!(ok(200, Outcome::Aborted), Verdict::Neutral);
        assert_eq!(
            Observed::default().verdict(Outcome::Dropped),
            Verdict::Neutral
        );

        let mut o = Observed::default();
        o.error(&pingora::Error::new_up(pingora::ErrorType::ConnectRefused));
        assert_eq!(
            o.verdict(Outcome::Failed),
            Verdict::Failure(Failure::Connect)
        );
        let mut o = Observed::default();
        o.status(200);
        o.error(&pingora::Error::new_up(
            pingora::ErrorType::ConnectionClosed,
        ));
        assert_eq!(o.verdict(Outcome::Failed), Verdict::Failure(Failure::Reset));
        let mut o = Observed::default();
        o.error(&pingora::Error::new_up(pingora::ErrorType::ReadTimedout));
        assert_eq!(
            o.verdict(Outcome::Failed),
            Verdict::Failure(Failure::Timeout)
        );
        let mut o = Observed::default();
        o.error(&pingora::Error::new_down(
            pingora::ErrorType::ConnectionClosed,
        ));
        assert_eq!(o.verdict(Outcome::Aborted), Verdict::Neutral);
        // A stale pooled connection is never observed (the proxy reconnects): no verdict.
        assert_eq!(
            Observed::default().verdict(Outcome::Failed),
            Verdict::Neutral
        );
    }
}
