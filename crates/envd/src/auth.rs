//! Who may call, and as whom.
//!
//! Access token: once `/init` set one, every request must carry it in
//! `X-Access-Token`, except `GET /health` (open), `/files` (token or a URL
//! signature, checked there) and `/init` (checked there). Failure is a 401
//! with envd's plain error JSON, which SDKs map to an authentication error.
//!
//! Acting user: RPCs name it with `Authorization: Basic base64("<user>:")`;
//! `/files` with the `username` query parameter.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use http::{HeaderMap, Method, StatusCode};
use wrenn_types::envd::ACCESS_TOKEN_HEADER;

use crate::http::error_response;
use crate::state::Envd;

/// The message SDKs show for a missing or wrong token.
pub const UNAUTHORIZED: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// The token presented in `headers`.
pub fn presented_token(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get(ACCESS_TOKEN_HEADER).map(|v| v.as_bytes())
}

/// Axum middleware enforcing the access token.
pub async fn require_token(State(state): State<Arc<Envd>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let exempt = (path == "/health" && req.method() == Method::GET)
        || path == "/files"
        || path == "/init"
        || req.method() == Method::OPTIONS;
    if !exempt && !state.token_ok(presented_token(req.headers())) {
        return error_response(StatusCode::UNAUTHORIZED, UNAUTHORIZED);
    }
    next.run(req).await
}

/// A malformed `Authorization` header.
#[derive(Debug, thiserror::Error)]
#[error("invalid authorization header: expected Basic credentials")]
pub struct BadAuthorization;

/// The username in `Authorization: Basic …`, if the header is present.
pub fn basic_user(headers: &HeaderMap) -> Result<Option<String>, BadAuthorization> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| BadAuthorization)?;
    let (scheme, encoded) = value.split_once(' ').ok_or(BadAuthorization)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(BadAuthorization);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| BadAuthorization)?;
    let text = String::from_utf8(decoded).map_err(|_| BadAuthorization)?;
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    Ok((!user.is_empty()).then(|| user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn parses_the_sdk_basic_user() {
        assert_eq!(
            basic_user(&headers("Basic cm9vdDo=")).unwrap().as_deref(),
            Some("root")
        );
        assert_eq!(
            basic_user(&headers("Basic dXNlcjo=")).unwrap().as_deref(),
            Some("user")
        );
        assert_eq!(basic_user(&HeaderMap::new()).unwrap(), None);
        assert!(basic_user(&headers("Bearer x")).is_err());
        assert!(basic_user(&headers("Basic !!!")).is_err());
    }
}
