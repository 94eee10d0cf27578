//! The CA's key material in Kubernetes: Istio's plugged-in `cacerts` Secret when the user
//! supplies one, otherwise our own root in a Secret created on first start (and reused by every
//! later start and replica); the root certificate is published in a ConfigMap agents trust.
use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tracing::info;

use crate::identity::{
    LocalCa,
    ca::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE},
};

/// Names of the objects, in the CA's namespace.
#[derive(Clone, Debug)]
pub struct RootObjects {
    pub namespace: String,
    /// Istio's plugged-in CA Secret (`cacerts`): used when present.
    pub cacerts_secret: String,
    /// Our self-signed root's Secret, created when neither exists.
    pub root_secret: String,
    /// The ConfigMap the root is published in (key `root-cert.pem`).
    pub root_configmap: String,
}

impl RootObjects {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            cacerts_secret: "cacerts".into(),
            root_secret: "mesh-ca-root".into(),
            root_configmap: "istio-ca-root-cert".into(),
        }
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

fn ca_from_secret(s: &Secret, trust_domain: &str, what: &str) -> anyhow::Result<LocalCa> {
    let data = s.data.clone().unwrap_or_default();
    let cert = text(&data, CA_CERT_FILE)
        .ok_or_else(|| anyhow::anyhow!("Secret {what} has no {CA_CERT_FILE}"))?;
    let key = text(&data, CA_KEY_FILE)
        .ok_or_else(|| anyhow::anyhow!("Secret {what} has no {CA_KEY_FILE}"))?;
    let root = text(&data, ROOT_CERT_FILE).unwrap_or_else(|| cert.clone());
    let chain = text(&data, CERT_CHAIN_FILE);
    LocalCa::from_pem(&cert, &key, &root, chain.as_deref(), trust_domain)
        .map_err(|e| anyhow::anyhow!("Secret {what}: {e}"))
}

/// Loads the CA: `cacerts` if present, else our root Secret, created (with a fresh root) if
/// missing. Two CA replicas starting together create it once: the loser of the race reads the
/// winner's.
pub async fn load_or_create(
    client: &Client,
    names: &RootObjects,
    trust_domain: &str,
    root_validity: Duration,
) -> anyhow::Result<LocalCa> {
    let secrets = Api::<Secret>::namespaced(client.clone(), &names.namespace);
    let plugged = format!("{}/{}", names.namespace, names.cacerts_secret);
    if let Some(s) = secrets.get_opt(&names.cacerts_secret).await? {
        info!(secret = %plugged, "using the plugged-in CA (Istio cacerts)");
        return ca_from_secret(&s, trust_domain, &plugged);
    }
    let ours = format!("{}/{}", names.namespace, names.root_secret);
    if let Some(s) = secrets.get_opt(&names.root_secret).await? {
        info!(secret = %ours, "using the CA root created earlier");
        return ca_from_secret(&s, trust_domain, &ours);
    }
    let (cert, key) = LocalCa::generate_root(trust_domain, root_validity)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(names.root_secret.clone()),
            namespace: Some(names.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".into(),
                "mesh-agent".into(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (CA_CERT_FILE.into(), ByteString(cert.clone().into_bytes())),
            (CA_KEY_FILE.into(), ByteString(key.into_bytes())),
            (ROOT_CERT_FILE.into(), ByteString(cert.into_bytes())),
        ])),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            info!(secret = %ours, "created a new CA root");
            ca_from_secret(&created, trust_domain, &ours)
        }
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            let s = secrets.get(&names.root_secret).await?;
            ca_from_secret(&s, trust_domain, &ours)
        }
        Err(e) => Err(anyhow::anyhow!("creating Secret {ours}: {e}")),
    }
}

/// Publishes the roots in the ConfigMap (created or replaced).
pub async fn publish(client: &Client, names: &RootObjects, ca: &LocalCa) -> anyhow::Result<()> {
    let maps = Api::<ConfigMap>::namespaced(client.clone(), &names.namespace);
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(names.root_configmap.clone()),
            namespace: Some(names.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".into(),
                "mesh-agent".into(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(ROOT_CERT_FILE.into(), ca.roots_pem())])),
        ..ConfigMap::default()
    };
    match maps.get_opt(&names.root_configmap).await? {
        Some(existing) if existing.data == cm.data => Ok(()),
        Some(existing) => {
            cm.metadata.resource_version = existing.metadata.resource_version;
            maps.replace(&names.root_configmap, &PostParams::default(), &cm)
                .await?;
            Ok(())
        }
        None => {
            maps.create(&PostParams::default(), &cm).await?;
            Ok(())
        }
    }
}
