//! Capsule IDs and template names from arbitrary strings: parsing never
//! panics, and whatever parses is safe as a path component and round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrenn_types::ids::{CapsuleId, TemplateName};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = s.parse::<CapsuleId>() {
        assert_eq!(id.as_str(), s);
        assert!(id.as_str().len() == 28 && !id.as_str().contains(['/', '.', '\0']));
        assert_eq!(id.as_str().parse::<CapsuleId>().unwrap(), id);
    }
    if let Ok(name) = s.parse::<TemplateName>() {
        assert_eq!(name.as_str(), s);
        assert!(!name.as_str().starts_with('.') && !name.as_str().contains(['/', '\0']));
    }
    let v = u128::from_le_bytes({
        let mut b = [0u8; 16];
        for (i, x) in data.iter().take(16).enumerate() {
            b[i] = *x;
        }
        b
    });
    let id = CapsuleId::from_u128(v);
    assert_eq!(id.as_str().parse::<CapsuleId>().unwrap(), id);
});
