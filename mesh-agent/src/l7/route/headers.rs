//! Header edits (set, add, remove) as both APIs write them, validated the same way: names are
//! HTTP tokens, values have no line breaks, pseudo-headers and `host` are not edited here.
use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};

use super::{
    FieldError,
    model::{HeaderEdit, HeaderOps},
};
use crate::l7::api::istio;

/// One `name: value` to set or add; `here` names the field in errors.
pub(super) fn header_pair(
    k: &str,
    v: &str,
    here: &str,
) -> Result<(HeaderName, HeaderValue), FieldError> {
    let name = HeaderName::from_bytes(k.as_bytes())
        .map_err(|_| (here.to_owned(), format!("{k:?} is not a valid header name")))?;
    if name.as_str().starts_with(':') || name == http::header::HOST {
        return Err((
            here.to_owned(),
            "pseudo-headers and Host cannot be edited here".into(),
        ));
    }
    let value = HeaderValue::from_str(v).map_err(|_| {
        (
            here.to_owned(),
            format!("{v:?} is not a valid header value"),
        )
    })?;
    Ok((name, value))
}

/// Header names to remove (`{field}[i]` in errors).
pub(super) fn header_names(names: &[String], field: &str) -> Result<Vec<HeaderName>, FieldError> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                (
                    format!("{field}[{i}]"),
                    format!("{n:?} is not a valid header name"),
                )
            })
        })
        .collect()
}

fn header_pairs(
    map: &BTreeMap<String, String>,
    field: &str,
) -> Result<Vec<(HeaderName, HeaderValue)>, FieldError> {
    map.iter()
        .map(|(k, v)| header_pair(k, v, &format!("{field}.{k}")))
        .collect()
}

fn header_edit(
    ops: Option<&istio::HeaderOperations>,
    field: &str,
) -> Result<HeaderEdit, FieldError> {
    let Some(ops) = ops else {
        return Ok(HeaderEdit::default());
    };
    Ok(HeaderEdit {
        set: header_pairs(&ops.set, &format!("{field}.set"))?,
        add: header_pairs(&ops.add, &format!("{field}.add"))?,
        remove: header_names(&ops.remove, &format!("{field}.remove"))?,
    })
}

pub(super) fn header_ops(h: Option<&istio::Headers>) -> Result<HeaderOps, FieldError> {
    Ok(HeaderOps {
        request: header_edit(h.and_then(|h| h.request.as_ref()), ".request")?,
        response: header_edit(h.and_then(|h| h.response.as_ref()), ".response")?,
    })
}
