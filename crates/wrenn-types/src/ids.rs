//! Typed, validated identifiers.
//!
//! A capsule ID becomes a directory, a cgroup, a container ID and a URL
//! label; a template name becomes a directory. Both are parsed once, at the
//! boundary, into newtypes whose constructors reject anything else, so code
//! past the boundary can use them in paths without further checks.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid ID or name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId {
    pub kind: &'static str,
    pub value: String,
}

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hostile input is echoed truncated and escaped.
        let shown: String = self.value.chars().take(64).collect();
        write!(f, "invalid {}: {:?}", self.kind, shown)
    }
}

impl std::error::Error for InvalidId {}

const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
/// 128 bits need 25 base-36 digits.
const ID_DIGITS: usize = 25;

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        // (Hash and Eq are the string's: maps keyed by the ID can be
        // searched by `&str`.)
        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $t {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
    };
}

/// Writes `v` as 25 big-endian base-36 digits, left-padded with `0`.
fn base36(mut v: u128) -> String {
    let mut digits = [b'0'; ID_DIGITS];
    for d in digits.iter_mut().rev() {
        *d = BASE36[(v % 36) as usize];
        v /= 36;
    }
    std::str::from_utf8(&digits)
        .expect("ascii digits")
        .to_owned()
}

fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source works");
    u128::from_be_bytes(b)
}

fn is_id_tail(t: &str) -> bool {
    t.len() == ID_DIGITS
        && t.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// An outward-facing ID: a prefix followed by 25 characters of `[0-9a-z]`,
/// the big-endian base-36 form of a random 128-bit value, left-padded with
/// `0` (wrenn's format). Each entity gets its own type, so a `TeamId` can
/// never be passed where a `CapsuleId` is expected.
macro_rules! prefixed_id {
    ($(#[$doc:meta])* $t:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $t(String);

        impl $t {
            pub const PREFIX: &'static str = $prefix;

            /// The ID for a 128-bit value.
            pub fn from_u128(v: u128) -> Self {
                Self(format!("{}{}", Self::PREFIX, base36(v)))
            }

            /// A fresh random ID.
            pub fn random() -> Self {
                Self::from_u128(random_u128())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $t {
            type Err = InvalidId;

            fn from_str(s: &str) -> Result<Self, InvalidId> {
                if s.strip_prefix(Self::PREFIX).is_some_and(is_id_tail) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(InvalidId {
                        kind: $kind,
                        value: s.to_owned(),
                    })
                }
            }
        }

        string_newtype_impls!($t);
    };
}

prefixed_id!(
    /// A capsule (sandbox): `cl-…`.
    CapsuleId, "cl-", "capsule ID"
);
prefixed_id!(
    /// A team: `team-…`.
    TeamId, "team-", "team ID"
);
prefixed_id!(
    /// An API key's record (not the secret): `key-…`.
    KeyId, "key-", "API key ID"
);
prefixed_id!(
    /// A host running an agent: `host-…`.
    HostId, "host-", "host ID"
);

/// A template (or snapshot) name: `^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateName(String);

impl TemplateName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TemplateName {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, InvalidId> {
        let b = s.as_bytes();
        let ok = (1..=64).contains(&b.len())
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidId {
                kind: "template name",
                value: s.to_owned(),
            })
        }
    }
}

string_newtype_impls!(TemplateName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capsule_ids_round_trip_and_reject_junk() {
        let id = CapsuleId::random();
        assert_eq!(id.as_str().len(), 28);
        assert_eq!(id.as_str().parse::<CapsuleId>().unwrap(), id);
        assert_eq!(
            CapsuleId::from_u128(0).as_str(),
            "cl-0000000000000000000000000"
        );
        assert_eq!(
            CapsuleId::from_u128(u128::MAX).as_str(),
            "cl-f5lxx1zz5pnorynqglhzmsp33"
        );
        for bad in [
            "",
            "cl-",
            "cl-ABC0000000000000000000000",
            "xx-0000000000000000000000000",
            "cl-000000000000000000000000",
            "cl-00000000000000000000000000",
            "cl-../../../etc/passwd0000",
        ] {
            assert!(bad.parse::<CapsuleId>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<CapsuleId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<CapsuleId>("\"cl-x\"").is_err());
    }

    #[test]
    fn template_names_follow_the_safe_name_rule() {
        for good in ["busybox", "minimal", "a", "A.b_c-d", &"x".repeat(64)] {
            assert!(good.parse::<TemplateName>().is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "..",
            "a b",
            &"x".repeat(65),
            "é",
        ] {
            assert!(bad.parse::<TemplateName>().is_err(), "{bad}");
        }
    }
}
