//! Who may drive this agent: whoever presents its token. The agent makes
//! a random token on first start (`<data-dir>/agent-token`, 0600) and
//! tells the control plane when it registers and heartbeats; every request
//! but `/health` must carry it in `X-Wrenn-Agent-Token`, compared in
//! constant time. The header goes no further: it is removed before the
//! RPC or the port proxy sees the request, so capsules never see it.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
pub use wrenn_types::hosts::AGENT_TOKEN_HEADER;

pub const TOKEN_FILE: &str = "agent-token";

/// The agent's token from `data_dir`, made (64 hex) if there is none.
pub fn load_or_create(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source works");
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    crate::register::write_private(&path, &format!("{token}\n"))?;
    Ok(token)
}

fn matches(presented: &http::HeaderValue, token: &str) -> bool {
    bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
}

/// Whether `headers` carry `token` (for handlers in front of [`require`]).
pub fn presents(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get(AGENT_TOKEN_HEADER)
        .is_some_and(|v| matches(v, token))
}

/// Middleware: pass requests that carry `token` (minus the header) and
/// `/health`; answer the rest 401 in Connect's error shape, which RPC
/// clients read as `unauthenticated` and anyone else can read too.
pub async fn require(State(token): State<Arc<str>>, mut req: Request, next: Next) -> Response {
    let presented = req.headers_mut().remove(AGENT_TOKEN_HEADER);
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    if presented.is_some_and(|v| matches(&v, &token)) {
        return next.run(req).await;
    }
    (
        http::StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({
            "code": "unauthenticated",
            "message": format!("this agent needs its token in {AGENT_TOKEN_HEADER}"),
        })),
    )
        .into_response()
}
