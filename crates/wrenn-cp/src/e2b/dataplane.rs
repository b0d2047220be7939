//! E2B's data plane on the API's own port (`docs/e2b-compat-plan.md` §1,
//! §6, §9): requests for a sandbox's envd (port 49983) or any other port
//! of it, relayed through the agent's path proxy like wrenn's subdomain
//! proxy does.
//!
//! Routing, in this order (the first two before the API's routes):
//! 1. `E2b-Sandbox-Id` + `E2b-Sandbox-Port` headers (what the SDKs send
//!    when `E2B_SANDBOX_URL` is set; API requests never carry them);
//! 2. Host `49983-{id}.{domain}` (other ports by Host keep wrenn's proxy
//!    answers, [`crate::proxy`]);
//! 3. `/files` with a `signature` and no routing: the running sandbox
//!    whose envd token verifies the signature (a browser or curl fetching
//!    a signed URL sends nothing else).
//!
//! No API key is needed or looked at: envd's access token guards envd, and
//! user ports are as open as E2B's. A sandbox that is unknown, killed,
//! paused or unreachable answers E2B's 502 `"The sandbox was not found"`;
//! a running one whose port nobody listens on, 502 `"… port is not
//! open"` — the SDKs classify errors by those substrings.
//!
//! Debug mode (`E2B_DEBUG=true`): the SDK sends `E2b-Sandbox-Id:
//! debug_sandbox_id` and no token. From a loopback peer that names one
//! long-lived `base` capsule of the admin team (created on first use,
//! found again after a restart by its metadata), and the relay adds its
//! envd token.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use subtle::ConstantTimeEq;
use wrenn_http::relay;
use wrenn_types::envd::{file_signature, FileOp, ACCESS_TOKEN_HEADER, ENVD_PORT};
use wrenn_types::ids::CapsuleId;

use crate::api::capsules::{self, Launch};
use crate::db::CapsuleRow;
use crate::events::Actor;
use crate::model::Status;
use crate::proxy::{self, Refusal};
use crate::server::Cp;

pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// The sandbox ID of E2B's debug mode.
pub const DEBUG_ID: &str = "debug_sandbox_id";
/// Metadata marking the debug-mode capsule.
const DEBUG_MARK: &str = "e2b_debug_sandbox";
const DEBUG_TEMPLATE: &str = "base";

/// Where the router's middleware should send a request.
#[derive(Debug)]
pub enum Routed {
    Done(Response),
    Pass(Request),
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// E2B's answer for a sandbox that is not there (or not running).
pub fn gone(id: &str) -> Response {
    json_response(
        StatusCode::BAD_GATEWAY,
        json!({"sandboxId": id, "message": "The sandbox was not found", "code": 502}),
    )
}

fn port_not_open(id: &str, port: u16) -> Response {
    json_response(
        StatusCode::BAD_GATEWAY,
        json!({
            "sandboxId": id,
            "message": "The sandbox is running but port is not open",
            "port": port,
            "code": 502,
        }),
    )
}

fn refusal(status: StatusCode, message: &str) -> Response {
    json_response(status, json!({"code": status.as_u16(), "message": message}))
}

/// Header- and signature-routed requests are served here; the rest pass.
pub async fn route(cp: &Cp, req: Request) -> Routed {
    if let Some(id) = req.headers().get(SANDBOX_ID_HEADER) {
        let Ok(id) = id.to_str().map(str::to_owned) else {
            return Routed::Done(refusal(StatusCode::BAD_REQUEST, "invalid E2b-Sandbox-Id"));
        };
        let port = req
            .headers()
            .get(SANDBOX_PORT_HEADER)
            .and_then(|p| p.to_str().ok())
            .and_then(|p| p.trim().parse::<u16>().ok())
            .filter(|p| *p > 0);
        let Some(port) = port else {
            return Routed::Done(refusal(
                StatusCode::BAD_REQUEST,
                "missing or invalid E2b-Sandbox-Port header",
            ));
        };
        return Routed::Done(serve(cp, req, &id, port).await);
    }
    if req.uri().path() == "/files" && !names_a_capsule(&req) {
        if let Some(sq) = signed_query(req.uri().query()) {
            return Routed::Done(signed(cp, req, sq).await);
        }
    }
    Routed::Pass(req)
}

/// Relay `req` to `port` of sandbox `id`, answering as E2B's proxy does.
pub async fn serve(cp: &Cp, mut req: Request, id: &str, port: u16) -> Response {
    let (cid, add_token) = if id == DEBUG_ID {
        // (debug mode is asked for: `wrenn up --e2b-debug`)
        if !cp.config.e2b_debug || !from_loopback(&req) {
            return gone(id);
        }
        match debug_capsule(cp).await {
            Ok(c) => (c.id, true),
            Err(e) => {
                tracing::warn!(error = %e.message, "no debug-mode sandbox");
                return refusal(StatusCode::SERVICE_UNAVAILABLE, &e.message);
            }
        }
    } else {
        match id.parse::<CapsuleId>() {
            Ok(c) => (c, false),
            Err(_) => return gone(id),
        }
    };
    let route = match proxy::lookup(cp, &cid).await {
        Ok(r) => r,
        Err(Refusal::Internal) => {
            return refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
        Err(_) => return gone(id),
    };
    if add_token && port == ENVD_PORT && !route.token.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&route.token) {
            req.headers_mut().insert(ACCESS_TOKEN_HEADER, v);
        }
    }
    let path = req.uri().path().to_owned();
    let resp = proxy::relay_to(cp, req, &cid, &route, port, &path, true).await;
    as_e2b(resp, id, port)
}

/// A relayed answer as E2B's proxy gives it: the hops' own refusals
/// become its JSON 502s.
pub fn as_e2b(resp: Response, id: &str, port: u16) -> Response {
    match relay::refusal_kind(&resp) {
        None => resp,
        Some("unreachable") => port_not_open(id, port),
        Some(_) => gone(id),
    }
}

/// Whether the Host names a capsule port (routed by Host instead).
fn names_a_capsule(req: &Request) -> bool {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    !matches!(
        wrenn_types::proxy::parse_host(host),
        wrenn_types::proxy::HostTarget::NotProxy
    )
}

fn from_loopback(req: &Request) -> bool {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(a)| a.ip().is_loopback())
}

/// The signed-URL parameters of a `/files` query: (path, signature,
/// expiration, username).
type SignedQuery = (String, String, Option<i64>, String);

fn signed_query(q: Option<&str>) -> Option<SignedQuery> {
    let (mut path, mut sig, mut exp, mut user) = (None, None, None, String::new());
    for (k, v) in form_urlencoded::parse(q?.as_bytes()) {
        match &*k {
            "path" => path = Some(v.into_owned()),
            "signature" => sig = Some(v.into_owned()),
            "signature_expiration" => exp = v.parse().ok(),
            "username" => user = v.into_owned(),
            _ => {}
        }
    }
    Some((path.unwrap_or_default(), sig?, exp, user))
}

/// An unrouted signed `/files` URL: find the sandbox it was signed for.
async fn signed(cp: &Cp, req: Request, sq: SignedQuery) -> Response {
    let (path, sig, exp, user) = sq;
    let op = if req.method() == Method::POST {
        FileOp::Write
    } else {
        FileOp::Read
    };
    let running = match cp.db.running_capsules().await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = ?e, "signed URL lookup failed");
            return refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
        }
    };
    // (compared in constant time: how long a refusal takes must not tell
    // how much of a guessed signature was right)
    let found = running.iter().find(|c| {
        !c.access_token.is_empty()
            && bool::from(
                file_signature(&path, op, &user, &c.access_token, exp)
                    .as_bytes()
                    .ct_eq(sig.as_bytes()),
            )
    });
    match found {
        Some(c) => serve(cp, req, c.id.as_str(), ENVD_PORT).await,
        None => refusal(
            StatusCode::UNAUTHORIZED,
            "the signature matches no running sandbox",
        ),
    }
}

/// The debug-mode capsule: running (resumed or created if needed).
async fn debug_capsule(cp: &Cp) -> Result<CapsuleRow, crate::error::ApiError> {
    let mut slot = cp.e2b.debug.lock().await;
    let team = cp
        .db
        .admin_team()
        .await?
        .ok_or_else(|| crate::error::ApiError::host_unavailable("no admin team yet"))?;
    let known = match slot.as_ref() {
        Some(id) => cp.db.capsule_any(id).await?,
        None => cp
            .db
            .capsules(&team.id)
            .await?
            .into_iter()
            .find(|c| c.metadata.contains_key(DEBUG_MARK)),
    };
    match known {
        Some(c) if c.status == Status::Running => {
            *slot = Some(c.id.clone());
            return Ok(c);
        }
        Some(c) if c.status == Status::Paused => {
            let c = capsules::resume_capsule(cp, &c, Actor::system()).await?;
            *slot = Some(c.id.clone());
            return Ok(c);
        }
        _ => {}
    }
    let template = cp
        .db
        .resolve_template(&team.id, DEBUG_TEMPLATE)
        .await?
        .ok_or_else(|| {
            crate::error::ApiError::host_unavailable("the base template is not built yet")
        })?;
    let mut spec = Launch::new(&template);
    spec.metadata.insert(DEBUG_MARK.into(), "true".into());
    spec.metadata_to_envd = false;
    let c = capsules::launch(cp, &team.id, Actor::system(), spec).await?;
    tracing::info!(capsule = %c.id, "created the E2B debug-mode sandbox");
    *slot = Some(c.id.clone());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_queries() {
        let (p, s, e, u) = signed_query(Some(
            "path=%2Ftmp%2Fa+b.txt&signature=v1_x&signature_expiration=9",
        ))
        .unwrap();
        assert_eq!(
            (p.as_str(), s.as_str(), e, u.as_str()),
            ("/tmp/a b.txt", "v1_x", Some(9), "")
        );
        let (_, _, e, u) = signed_query(Some("path=a&signature=v1_y&username=root")).unwrap();
        assert_eq!((e, u.as_str()), (None, "root"));
        assert!(signed_query(Some("path=a")).is_none());
        assert!(signed_query(None).is_none());
    }
}
