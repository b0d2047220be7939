//! Recipes and healthcheck lines from arbitrary text: no panics; a parsed
//! recipe has 1..=MAX_STEPS steps, COPY sources are relative without `..`,
//! ENV keys are shell names, and expanded text stays within its bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrenn_types::recipe::{parse, parse_healthcheck, Step, MAX_EXPANDED_BYTES, MAX_STEPS};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(steps) = parse(text) {
        assert!(!steps.is_empty() && steps.len() <= MAX_STEPS);
        let expanded: usize = steps
            .iter()
            .map(|s| match s {
                Step::Env { value, .. } => value.len(),
                Step::Workdir { path } => path.len(),
                _ => 0,
            })
            .sum();
        assert!(expanded <= MAX_EXPANDED_BYTES);
        for s in &steps {
            match s {
                Step::Copy { sources, .. } => {
                    for src in sources {
                        assert!(!src.starts_with('/') && !src.split('/').any(|p| p == ".."));
                    }
                }
                Step::Env { key, .. } => {
                    assert!(key.bytes().all(|b| b == b'_' || b.is_ascii_alphanumeric()));
                }
                Step::Run { cmd, .. } | Step::Start { cmd } => assert!(!cmd.is_empty()),
                _ => {}
            }
        }
    }
    if let Ok(h) = parse_healthcheck(text) {
        assert!(!h.cmd.is_empty() && !h.interval.is_zero());
    }
});
