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

/// What a subdomain proxy host (`{port}-{capsule}.{domain}[:port]`) names.
#[derive(Debug, PartialEq, Eq)]
pub enum HostTarget<'a> {
    /// Not a proxy host: the API serves it.
    NotProxy,
    /// A proxy host with a port out of range or a malformed capsule ID.
    Invalid(&'static str),
    Capsule {
        port: u16,
        id: &'a str,
    },
}

/// Read a `Host` header: `^(\d+)-(cl-[0-9a-z]+)\.` selects the proxy (any
/// suffix; a trailing `:port` is ignored); then the port must be 1–65535
/// and the ID well formed (checked by the caller's ID type too).
pub fn parse_host(host: &str) -> HostTarget<'_> {
    let Some((digits, tail)) = host.split_once('-') else {
        return HostTarget::NotProxy;
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return HostTarget::NotProxy;
    }
    let Some(id_end) = tail.find('.') else {
        return HostTarget::NotProxy;
    };
    let id = &tail[..id_end];
    let is_id = id.strip_prefix("cl-").is_some_and(|t| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    });
    if !is_id {
        return HostTarget::NotProxy;
    }
    let port = match digits.parse::<u32>() {
        Ok(p @ 1..=65535) => p as u16,
        _ => return HostTarget::Invalid("invalid port"),
    };
    if id.len() != 28 {
        return HostTarget::Invalid("invalid capsule ID");
    }
    HostTarget::Capsule { port, id }
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

    #[test]
    fn proxy_hosts() {
        let id = "cl-0123456789abcdefghijklmno";
        assert_eq!(
            parse_host(&format!("8080-{id}.localhost:9000")),
            HostTarget::Capsule { port: 8080, id }
        );
        assert_eq!(
            parse_host(&format!("8888-{id}.wrenn.dev")),
            HostTarget::Capsule { port: 8888, id }
        );
        assert_eq!(parse_host("localhost:8000"), HostTarget::NotProxy);
        assert_eq!(parse_host("127.0.0.1:8000"), HostTarget::NotProxy);
        assert_eq!(parse_host(&format!("x8-{id}.a")), HostTarget::NotProxy);
        assert_eq!(
            parse_host(&format!("0-{id}.a")),
            HostTarget::Invalid("invalid port")
        );
        assert_eq!(
            parse_host(&format!("70000-{id}.a")),
            HostTarget::Invalid("invalid port")
        );
        assert_eq!(
            parse_host("80-cl-abc.a"),
            HostTarget::Invalid("invalid capsule ID")
        );
    }

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
