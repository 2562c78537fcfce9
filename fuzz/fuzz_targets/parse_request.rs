//! libFuzzer target: `LlmRequest::parse` on arbitrary bytes, and the prefix chain and canonical
//! JSON on whatever JSON those bytes hold. Checks: no panic, no stack overflow, deterministic
//! results, canonical JSON that parses.

#![no_main]

#[allow(dead_code)]
#[path = "../../src/prefix.rs"]
mod prefix;
#[allow(dead_code)]
#[path = "../../src/request.rs"]
mod request;
#[allow(dead_code)]
#[path = "../../src/telemetry/labels.rs"]
mod labels;
/// What request.rs imports of the crate's telemetry: the fallback-reason labels.
mod telemetry {
    pub use crate::labels::FallbackReason;
}

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let r = request::LlmRequest::parse(data);
    let again = request::LlmRequest::parse(data);
    assert_eq!(r.blocks, again.blocks);
    assert_eq!(r.model, again.model);
    assert_eq!(r.body, again.body);
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        let chat = prefix::chat_blocks("m", &v);
        assert_eq!(chat, prefix::chat_blocks("m", &v));
        let _ = prefix::prompt_blocks("m", &v);
        let mut out = Vec::new();
        prefix::canonical_json(&v, &mut out);
        // Canonical JSON is JSON again (floats may move by one ulp, see tests/fuzz_parse.rs).
        let back: Value = serde_json::from_slice(&out).expect("canonical JSON parses");
        assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(&v));
    }
});
