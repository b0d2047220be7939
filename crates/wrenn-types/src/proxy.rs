//! Proxy path handling shared by the agent's port proxy and the control
//! plane: splitting `/proxy/{capsule}/{port}{rest}` without decoding or
//! normalising anything, and rewriting `Location` headers so clients stay
//! behind the prefix. Untrusted input reaches both; they are fuzzed
//! (`crates/wrenn-types/fuzz`).

use std::net::SocketAddr;

/// A parsed `/proxy/{capsule}/{port}{rest}` path; fields are unvalidated
/// slices of the input.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub id: &'a str,
    pub port: &'a str,
    /// Starts with `/` (an empty rest becomes `/`); still percent-encoded.
    pub rest: &'a str,
}

/// Split a raw request path; `None` when it is not a proxy path.
pub fn parse_target(path: &str) -> Option<Target<'_>> {
    let tail = path.strip_prefix("/proxy/")?;
    let (id, tail) = tail.split_once('/').unwrap_or((tail, ""));
    let (port, rest) = match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, "/"),
    };
    if id.is_empty() || port.is_empty() {
        return None;
    }
    Some(Target { id, port, rest })
}

/// The `Location` to send instead of `location`, if it needs the prefix: a
/// root-relative one gets it; an absolute one naming the upstream itself
/// (by address, `localhost` or `127.0.0.1` and the same port) becomes the
/// prefix plus its path. Anything else is left alone (`None`).
pub fn rewrite_location(location: &str, upstream: SocketAddr, prefix: &str) -> Option<String> {
    if location.starts_with('/') && !location.starts_with("//") {
        return Some(format!("{prefix}{location}"));
    }
    let rest = location
        .strip_prefix("http://")
        .or_else(|| location.strip_prefix("https://"))?;
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let port = upstream.port();
    let ours = [
        upstream.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
    ];
    if ours.iter().any(|a| a.eq_ignore_ascii_case(authority)) {
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        return Some(format!("{prefix}{path}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_the_raw_rest() {
        let t = parse_target("/proxy/cl-x/8080/a%2Fb/c/").unwrap();
        assert_eq!(
            t,
            Target {
                id: "cl-x",
                port: "8080",
                rest: "/a%2Fb/c/"
            }
        );
        assert_eq!(parse_target("/proxy/cl-x/80").unwrap().rest, "/");
        assert_eq!(parse_target("/proxy/cl-x/80/").unwrap().rest, "/");
        assert_eq!(parse_target("/proxy/cl-x//x").map(|t| t.port), None);
        assert_eq!(parse_target("/proxy/"), None);
        assert_eq!(parse_target("/other/x/1"), None);
    }

    #[test]
    fn locations_keep_the_prefix() {
        let up: SocketAddr = "10.88.0.2:8000".parse().unwrap();
        let p = "/proxy/cl-a/8000";
        assert_eq!(
            rewrite_location("/docs/", up, p).unwrap(),
            "/proxy/cl-a/8000/docs/"
        );
        assert_eq!(
            rewrite_location("http://10.88.0.2:8000/x?y=1", up, p).unwrap(),
            "/proxy/cl-a/8000/x?y=1"
        );
        assert_eq!(
            rewrite_location("http://localhost:8000", up, p).unwrap(),
            "/proxy/cl-a/8000/"
        );
        assert_eq!(
            rewrite_location("http://localhost:8000?q", up, p).unwrap(),
            "/proxy/cl-a/8000/?q"
        );
        assert_eq!(rewrite_location("https://example.com/x", up, p), None);
        assert_eq!(rewrite_location("//evil.example/x", up, p), None);
        assert_eq!(rewrite_location("relative/x", up, p), None);
    }
}
