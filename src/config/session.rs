//! Session affinity (`session_affinity` of a pool): which request headers and body fields name the
//! session or agent a request belongs to. A session is a preference, not a pin: the policies that
//! keep state place its first request as usual, send the next ones where it went, and move it
//! under the same load guard as prefix affinity.

use serde_json::Value;

use super::file::SessionFile;
use super::InvalidKey;

/// Headers that name a session by default: the ones agents send.
const DEFAULT_HEADERS: &[&str] = &[
    "x-session-id",
    "x-claude-code-session-id",
    "session-id",
    "session_id",
];

/// Body fields that name a session by default (a dot walks into an object): OpenAI's
/// `prompt_cache_key` and `user`, Anthropic's `metadata.user_id`.
const DEFAULT_BODY_FIELDS: &[&str] = &["prompt_cache_key", "user", "metadata.user_id"];

/// Where a pool finds a request's session, first match wins: headers, then body fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Header names, lower case.
    pub headers: Vec<String>,
    /// Body fields, as dotted paths.
    pub body_fields: Vec<String>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            headers: DEFAULT_HEADERS.iter().map(|h| (*h).to_owned()).collect(),
            body_fields: DEFAULT_BODY_FIELDS
                .iter()
                .map(|f| (*f).to_owned())
                .collect(),
        }
    }
}

impl SessionConfig {
    /// The settings of `file` (`None`: on with the defaults); `Ok(None)` when turned off.
    pub fn from_file(file: Option<&SessionFile>) -> Result<Option<Self>, Vec<InvalidKey>> {
        let Some(f) = file else {
            return Ok(Some(Self::default()));
        };
        if f.enabled == Some(false) {
            return Ok(None);
        }
        let mut bad = Vec::new();
        let headers = match &f.headers {
            None => Self::default().headers,
            Some(names) => names
                .iter()
                .filter_map(|n| match http::HeaderName::from_bytes(n.as_bytes()) {
                    Ok(h) => Some(h.as_str().to_owned()),
                    Err(_) => {
                        bad.push(InvalidKey::new(
                            "headers",
                            format!("'{n}' is not a header name"),
                        ));
                        None
                    }
                })
                .collect(),
        };
        let body_fields = match &f.body_fields {
            None => Self::default().body_fields,
            Some(fields) => {
                for field in fields {
                    if field.is_empty() || field.split('.').any(str::is_empty) {
                        bad.push(InvalidKey::new(
                            "body_fields",
                            format!("'{field}' is not a field path (a.b.c)"),
                        ));
                    }
                }
                fields.clone()
            }
        };
        if headers.is_empty() && body_fields.is_empty() {
            bad.push(InvalidKey::new(
                "headers",
                "name at least one header or body field, or set enabled: false",
            ));
        }
        if bad.is_empty() {
            Ok(Some(SessionConfig {
                headers,
                body_fields,
            }))
        } else {
            Err(bad)
        }
    }

    /// The session a request names: the first configured header present, else the first body
    /// field holding a non-empty string or a number.
    pub fn session_of<'a>(
        &self,
        headers: &'a http::HeaderMap,
        body: Option<&'a Value>,
    ) -> Option<std::borrow::Cow<'a, str>> {
        for name in &self.headers {
            if let Some(v) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                if !v.trim().is_empty() {
                    return Some(v.trim().into());
                }
            }
        }
        let body = body?;
        self.body_fields.iter().find_map(|path| {
            let v = path.split('.').try_fold(body, |v, k| v.get(k))?;
            match v {
                Value::String(s) if !s.trim().is_empty() => Some(s.trim().into()),
                Value::Number(n) => Some(n.to_string().into()),
                Value::String(_)
                | Value::Null
                | Value::Bool(_)
                | Value::Array(_)
                | Value::Object(_) => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn headers_first_then_body_fields() {
        let c = SessionConfig::default();
        let body = serde_json::json!({"user": "u1", "metadata": {"user_id": "claude"}});
        let h = headers(&[("x-claude-code-session-id", "abc")]);
        assert_eq!(c.session_of(&h, Some(&body)).as_deref(), Some("abc"));
        let none = headers(&[]);
        assert_eq!(c.session_of(&none, Some(&body)).as_deref(), Some("u1"));
        let anthropic = serde_json::json!({"metadata": {"user_id": "claude"}});
        assert_eq!(
            c.session_of(&none, Some(&anthropic)).as_deref(),
            Some("claude")
        );
        let empty = serde_json::json!({"user": "  ", "prompt_cache_key": 7});
        assert_eq!(c.session_of(&none, Some(&empty)).as_deref(), Some("7"));
        assert_eq!(c.session_of(&none, None), None);
    }

    #[test]
    fn settings_are_checked() {
        let off = SessionFile {
            enabled: Some(false),
            headers: None,
            body_fields: None,
        };
        assert_eq!(SessionConfig::from_file(Some(&off)), Ok(None));
        let custom = SessionFile {
            enabled: None,
            headers: Some(vec!["X-Conversation".into()]),
            body_fields: Some(vec![]),
        };
        let c = SessionConfig::from_file(Some(&custom))
            .expect("valid")
            .expect("on");
        assert_eq!(c.headers, ["x-conversation"]);
        let bad = SessionFile {
            enabled: None,
            headers: Some(vec!["bad header".into()]),
            body_fields: Some(vec!["a..b".into()]),
        };
        let e = SessionConfig::from_file(Some(&bad)).expect_err("invalid");
        assert_eq!(e.len(), 2, "{e:?}");
    }
}
