//! `POST /v1/admin/builds` (admin team): build a platform template from a
//! recipe, synchronously; 201 with the template and the build log.
//! `COPY` needs a build context, which this route does not take (the
//! builder's in-process callers can give one).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_types::ids::TemplateName;

use super::ApiJson;
use crate::auth::Caller;
use crate::build::{build, BuildError, BuildSpec};
use crate::error::{ApiError, ApiResult};
use crate::model::TemplateJson;
use crate::server::Cp;
use wrenn_types::recipe::{parse, parse_healthcheck, Step};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RecipeText {
    Lines(Vec<String>),
    Text(String),
}

#[derive(Debug, Deserialize)]
pub struct BuildBody {
    #[serde(default)]
    name: String,
    base_template: Option<String>,
    recipe: RecipeText,
    healthcheck: Option<String>,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
}

pub async fn create(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    ApiJson(body): ApiJson<BuildBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_admin()?;
    let name: TemplateName = body
        .name
        .parse()
        .map_err(|_| ApiError::invalid(format!("invalid template name {:?}", body.name)))?;
    let text = match body.recipe {
        RecipeText::Lines(l) => l.join("\n"),
        RecipeText::Text(t) => t,
    };
    let steps = parse(&text).map_err(|e| ApiError::invalid(format!("recipe: {e}")))?;
    if steps.iter().any(|s| matches!(s, Step::Copy { .. })) {
        return Err(ApiError::invalid(
            "COPY needs a build context, which this route does not take",
        ));
    }
    let healthcheck = body
        .healthcheck
        .filter(|h| !h.trim().is_empty())
        .map(|h| parse_healthcheck(&h))
        .transpose()
        .map_err(|e| ApiError::invalid(format!("healthcheck: {e}")))?;
    let spec = BuildSpec {
        name,
        base: body.base_template.unwrap_or_else(|| "minimal".into()),
        steps,
        healthcheck,
        context: None,
        vcpus: body.vcpus.filter(|v| (1..=16).contains(v)).unwrap_or(2),
        memory_mb: body
            .memory_mb
            .filter(|m| (128..=65536).contains(m))
            .unwrap_or(2048),
    };
    let mut logs = Vec::new();
    let mut log = |l: String| logs.push(l);
    let row = build(&cp, spec, &mut log).await.map_err(|e| match e {
        BuildError::NoBase(b) => ApiError::not_found(format!("base template {b} not found")),
        BuildError::Exists(n) => ApiError::conflict(format!("template {n} exists")),
        BuildError::Api(m) if m.starts_with("host_unavailable") => ApiError::host_unavailable(m),
        other => ApiError::invalid(format!("build failed: {other}")),
    })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"template": TemplateJson::from(&row), "logs": logs})),
    ))
}
