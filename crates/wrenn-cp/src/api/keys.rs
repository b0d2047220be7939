//! API keys and teams. A team's key manages that team's keys; the admin
//! team (made by `wrenn up`) can also create teams, each with its first
//! key, which is how a second tenant is set up.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_types::ids::{KeyId, TeamId};

use super::{ApiJson, Path, Query};
use crate::auth::{create_key as make_key, random_hex, Caller, KeyKind};
use crate::db::{now_ms, ApiKey, Team};
use crate::error::{ApiError, ApiResult};
use crate::model::rfc3339;
use crate::server::Cp;

#[derive(Debug, Deserialize)]
pub struct NameBody {
    #[serde(default)]
    name: String,
}

fn key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id.to_string(), "team_id": k.team_id.to_string(), "name": k.name,
        "kind": k.kind, "key_prefix": k.key_prefix, "created_at": rfc3339(k.created_at),
        "last_used": k.last_used.map(rfc3339),
    })
}

fn team_json(t: &Team) -> Value {
    json!({
        "id": t.id.to_string(), "name": t.name, "slug": t.slug, "is_admin": t.is_admin,
        "created_at": rfc3339(t.created_at),
    })
}

fn check_name(name: &str, what: &str) -> ApiResult<()> {
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{what} name must be 1 to 128 printable characters"
        )));
    }
    Ok(())
}

/// `POST /v1/api-keys[?kind=e2b]` `{name}` — 201; the key is in the
/// answer and nowhere else.
pub async fn create_key(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Query(q): Query<std::collections::HashMap<String, String>>,
    ApiJson(body): ApiJson<NameBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let name = if body.name.is_empty() {
        "key".to_owned()
    } else {
        body.name
    };
    check_name(&name, "key")?;
    let kind = match q.get("kind").map(String::as_str) {
        None | Some("") | Some("wrenn") => KeyKind::Wrenn,
        Some("e2b") => KeyKind::E2b,
        Some(other) => return Err(ApiError::invalid(format!("unknown key kind {other:?}"))),
    };
    let (key, secret) = make_key(&cp.db, caller.team_id(), &name, kind).await?;
    let mut v = key_json(&key);
    v["key"] = json!(secret);
    Ok((StatusCode::CREATED, Json(v)))
}

/// `GET /v1/api-keys`
pub async fn list_keys(State(cp): State<Arc<Cp>>, caller: Caller) -> ApiResult<Json<Vec<Value>>> {
    let keys = cp.db.keys(caller.team_id()).await?;
    Ok(Json(keys.iter().map(key_json).collect()))
}

/// `DELETE /v1/api-keys/{id}` — 204.
pub async fn delete_key(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id: KeyId = id
        .parse()
        .map_err(|_| ApiError::invalid("invalid API key ID"))?;
    if cp.db.delete_key(caller.team_id(), &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("API key not found"))
    }
}

/// Create a team (and, with it, its first wrenn key).
pub async fn new_team(cp: &Cp, name: &str, is_admin: bool) -> ApiResult<(Team, String)> {
    let team = Team {
        id: TeamId::random(),
        name: name.to_owned(),
        slug: format!("{}-{}", random_hex(3), random_hex(3)),
        is_admin,
        created_at: now_ms(),
    };
    cp.db.insert_team(&team).await?;
    let (_, secret) = make_key(&cp.db, &team.id, "default", KeyKind::Wrenn).await?;
    Ok((team, secret))
}

/// `POST /v1/teams` `{name}` (admin team only) — 201 with `api_key`.
pub async fn create_team(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    ApiJson(body): ApiJson<NameBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_admin()?;
    check_name(&body.name, "team")?;
    let (team, secret) = new_team(&cp, &body.name, false).await?;
    let mut v = team_json(&team);
    v["api_key"] = json!(secret);
    Ok((StatusCode::CREATED, Json(v)))
}

/// `GET /v1/teams` — the caller's team (every team for the admin team).
pub async fn list_teams(State(cp): State<Arc<Cp>>, caller: Caller) -> ApiResult<Json<Vec<Value>>> {
    let teams = if caller.team.is_admin {
        cp.db.teams().await?
    } else {
        vec![caller.team.clone()]
    };
    Ok(Json(teams.iter().map(team_json).collect()))
}

/// `GET /v1/teams/{id}`
pub async fn get_team(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id: TeamId = id
        .parse()
        .map_err(|_| ApiError::invalid("invalid team ID"))?;
    if id != caller.team.id && !caller.team.is_admin {
        return Err(ApiError::not_found("team not found"));
    }
    let team = cp
        .db
        .team(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("team not found"))?;
    Ok(Json(team_json(&team)))
}
