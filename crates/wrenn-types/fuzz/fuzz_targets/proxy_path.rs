//! Proxy paths and `Location` headers from arbitrary strings: no panics;
//! a parsed target is made of slices of the input, `rest` starts with `/`;
//! a rewritten Location always starts with the prefix; a proxy host names
//! a port in range and an ID taken from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrenn_types::proxy::{parse_host, parse_target, rewrite_location, HostTarget};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(raw) = std::str::from_utf8(rest) else { return };
    // Steer most inputs into the interesting shapes.
    let s = match mode % 4 {
        0 => raw.to_owned(),
        1 => format!("/proxy/{raw}"),
        2 => format!("http://10.88.0.2:8080{raw}"),
        _ => format!("http://localhost:{raw}"),
    };
    let s = s.as_str();
    if let Some(t) = parse_target(s) {
        assert!(t.rest.starts_with('/'));
        assert!(!t.id.is_empty() && !t.port.is_empty() && !t.id.contains('/') && !t.port.contains('/'));
        let rebuilt = format!("/proxy/{}/{}{}", t.id, t.port, t.rest);
        assert!(rebuilt == s || format!("{s}/") == rebuilt, "{s:?} → {rebuilt:?}");
    }
    if let HostTarget::Capsule { port, id } = parse_host(s) {
        assert!(port > 0 && id.len() == 28 && s.contains(id));
    }
    let prefix = "/proxy/cl-0000000000000000000000000/8080";
    if let Some(l) = rewrite_location(s, "10.88.0.2:8080".parse().unwrap(), prefix) {
        assert!(l.starts_with(prefix), "{l:?}");
    }
});
