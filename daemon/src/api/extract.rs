//! Request extractors that turn every malformed input into an [`ApiError`] with a JSON
//! body, instead of axum's plain-text rejections.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bearman_proto::uuid::NodeUuid;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body. An empty body is accepted as `T::default()` for endpoints whose body is
/// optional (see [`OptionalJson`]); here it is an error.
pub struct JsonBody<T>(pub T);

/// A JSON body that may be absent.
pub struct OptionalJson<T>(pub T);

async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "request body exceeds the configured limit",
                )
            } else {
                ApiError::bad_request("unreadable_body", rejection.body_text())
            }
        })
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let value = parsed.map_err(|error| {
        use serde_json::error::Category;
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            Category::Data if path != "." && !path.is_empty() => {
                ApiError::unprocessable(format!("field {path}: {inner}"))
            }
            Category::Data => ApiError::unprocessable(inner.to_string()),
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad_request("invalid_json", format!("body is not valid JSON: {inner}"))
            }
        }
    })?;
    // Trailing garbage after the document is a syntax error too.
    deserializer.end().map_err(|error| {
        ApiError::bad_request("invalid_json", format!("body is not valid JSON: {error}"))
    })?;
    Ok(value)
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(request, state).await?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "missing_body",
                "a JSON body is required",
            ));
        }
        parse_json(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(request, state).await?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

/// The `{uuid}` path segment, validated.
pub struct UuidPath(pub NodeUuid);

impl<S: Send + Sync> FromRequestParts<S> for UuidPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Every route with {uuid} has exactly one path parameter.
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))?;
        NodeUuid::parse(&raw)
            .map(UuidPath)
            .map_err(|error| ApiError::bad_request("invalid_uuid", error.to_string()))
    }
}

/// The `{name}` path segment.
pub struct NamePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for NamePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Every route with {name} has exactly one path parameter.
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))?;
        Ok(NamePath(name))
    }
}

/// Query parameters, checked against the names an endpoint knows so a typo is a 400, not
/// a silently ignored filter.
pub struct QueryParams(pub BTreeMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let mut params = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |text: &str| {
                percent_decode(text).ok_or_else(|| {
                    ApiError::bad_request("invalid_query", format!("bad escape in {text:?}"))
                })
            };
            params.insert(decode(key)?, decode(value)?);
        }
        Ok(QueryParams(params))
    }
}

impl QueryParams {
    pub fn allow_only(&self, known: &[&str]) -> Result<(), ApiError> {
        for key in self.0.keys() {
            if !known.contains(&key.as_str()) {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "unknown query parameter {key:?}; known: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ApiError> {
        self.get(key)
            .map(|value| {
                value.parse::<T>().map_err(|_| {
                    ApiError::bad_request(
                        "invalid_query",
                        format!("query parameter {key}: {value:?} is not valid"),
                    )
                })
            })
            .transpose()
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = text.get(index + 1..index + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                index += 3;
            }
            b'+' => {
                out.push(b' ');
                index += 1;
            }
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}
