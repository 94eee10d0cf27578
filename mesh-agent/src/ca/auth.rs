//! Who is asking, and for which identity it may ask.
//!
//! - Authentication: the caller's projected service-account token (audience `istio-ca`) is
//!   checked by the API server (TokenReview); the result names the service account and, for a
//!   bound token, the pod (and node) it was issued to.
//! - Authorization: a caller gets its own identity. The node agent's service account may also
//!   ask for the identity of a service account that has a pod **on the caller's node** (the
//!   node named by the caller's own token, never by the request). Everyone else is refused.
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

use crate::identity::SpiffeId;

/// The audience CA tokens carry (Istio's).
pub const CA_AUDIENCE: &str = "istio-ca";

/// A verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token was bound to, if it was.
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    /// The node the token says the pod runs on (bound tokens, Kubernetes ≥ 1.32).
    pub node: Option<String>,
}

/// Why a request was refused, as the gRPC status will say.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
}

/// The TokenReview result's `user.extra` keys for bound tokens.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Checks a bearer token with the API server.
pub async fn authenticate(client: &Client, token: &str) -> Result<Caller, Refusal> {
    if token.is_empty() {
        return Err(Refusal::Unauthenticated(
            "no bearer token (authorization: Bearer <projected service-account token>)".into(),
        ));
    }
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![CA_AUDIENCE.to_owned()]),
        },
        ..TokenReview::default()
    };
    let done = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
    let status = done.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Refusal::Unauthenticated(format!(
            "the token was not accepted: {}",
            status.error.unwrap_or_else(|| "no reason given".into())
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
        return Err(Refusal::Unauthenticated(format!(
            "{username:?} is not a service account"
        )));
    };
    let Some((namespace, service_account)) = rest.split_once(':') else {
        return Err(Refusal::Unauthenticated(format!(
            "malformed service-account user {username:?}"
        )));
    };
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    Ok(Caller {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod: first(EXTRA_POD_NAME),
        pod_uid: first(EXTRA_POD_UID),
        node: first(EXTRA_NODE_NAME),
    })
}

/// The node the caller runs on: from its token, or from the pod its token is bound to.
async fn caller_node(client: &Client, caller: &Caller) -> Result<String, Refusal> {
    if let Some(node) = &caller.node {
        return Ok(node.clone());
    }
    let Some(pod) = &caller.pod else {
        return Err(Refusal::PermissionDenied(
            "the node agent's token is not bound to a pod: cannot tell which node it runs on"
                .into(),
        ));
    };
    let p = Api::<Pod>::namespaced(client.clone(), &caller.namespace)
        .get(pod)
        .await
        .map_err(|e| Refusal::Unavailable(format!("looking up the caller's pod {pod}: {e}")))?;
    if let (Some(want), Some(have)) = (&caller.pod_uid, &p.metadata.uid)
        && want != have
    {
        return Err(Refusal::PermissionDenied(format!(
            "the token was issued to an earlier pod named {pod}"
        )));
    }
    p.spec.and_then(|s| s.node_name).ok_or_else(|| {
        Refusal::PermissionDenied(format!("the caller's pod {pod} is not scheduled"))
    })
}

/// Whether `caller` may have a certificate for `requested`.
pub async fn authorize(
    client: &Client,
    caller: &Caller,
    requested: &SpiffeId,
    node_agent: &(String, String),
) -> Result<(), Refusal> {
    if requested.namespace == caller.namespace
        && requested.service_account == caller.service_account
    {
        return Ok(());
    }
    if (caller.namespace.as_str(), caller.service_account.as_str())
        != (node_agent.0.as_str(), node_agent.1.as_str())
    {
        return Err(Refusal::PermissionDenied(format!(
            "{}/{} may only ask for its own identity, not {requested} (only the node agent's service account {}/{} may ask for others')",
            caller.namespace, caller.service_account, node_agent.0, node_agent.1
        )));
    }
    let node = caller_node(client, caller).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &requested.namespace)
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(|e| Refusal::Unavailable(format!("listing pods on {node}: {e}")))?;
    // The field selector is the API server's; the check is ours too.
    let has_pod = pods.items.iter().any(|p| {
        let spec = p.spec.as_ref();
        spec.and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
            && spec
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                == requested.service_account
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
    });
    if has_pod {
        Ok(())
    } else {
        Err(Refusal::PermissionDenied(format!(
            "no pod of service account {}/{} runs on the caller's node {node}",
            requested.namespace, requested.service_account
        )))
    }
}
