//! Kratos service instances: the JSON value a Kratos registry stores under
//! `{root}/{service}/{id}` (an etcd key, a ZooKeeper znode), and how it becomes
//! endpoints. Shared by the registry providers; pure functions, so they are tested (and
//! fuzzed, by path from `fuzz/src/checks.rs`) natively.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use wasd_sdk::Endpoint;

/// A service instance exactly as Kratos's registries write it (`json.Marshal`). Unknown fields are
/// ignored and `"metadata": null` is accepted, as Go's encoder writes a nil map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<String>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Instance {
    pub fn parse(value: &[u8]) -> Result<Instance, String> {
        serde_json::from_slice(value).map_err(|e| format!("not a Kratos service instance: {e}"))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a map of strings always serialises")
    }

    /// The instance's endpoints, each tagged with the instance's id, version and
    /// metadata. Endpoint URLs that do not parse are returned as errors, so the caller
    /// can report them and keep the rest.
    pub fn endpoints(&self) -> Vec<Result<Endpoint, String>> {
        self.endpoints
            .iter()
            .map(|url| {
                let mut endpoint = parse_endpoint(url)?;
                endpoint.metadata.push(("instance-id".into(), self.id.clone()));
                if !self.version.is_empty() {
                    endpoint.metadata.push(("version".into(), self.version.clone()));
                }
                for (key, value) in &self.metadata {
                    endpoint.metadata.push((key.clone(), value.clone()));
                }
                Ok(endpoint)
            })
            .collect()
    }
}

/// Parse one Kratos endpoint URL, honouring the legacy `?isSecure=true` suffix (an
/// `http` endpoint so marked is `https`, a `grpc` one `grpcs`), as Kratos does.
pub fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let mut endpoint = Endpoint::parse(url).map_err(|e| e.to_string())?;
    if endpoint.scheme.is_none() {
        return Err(format!("'{url}' has no scheme (Kratos endpoints are URLs)"));
    }
    let secure = url
        .split_once('?')
        .map(|(_, query)| query.split('#').next().unwrap_or_default())
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .any(|(key, value)| key == "isSecure" && matches!(value, "true" | "1" | "t" | "T" | "TRUE" | "True"));
    if secure
        && let Some(scheme) = &mut endpoint.scheme
        && !scheme.ends_with('s')
    {
        scheme.push('s');
    }
    Ok(endpoint)
}

/// Whether an endpoint answers a named-endpoint query (`_grpc.hello`): Kratos
/// endpoints are named by their scheme.
pub fn matches_name(endpoint: &Endpoint, name: &str) -> bool {
    endpoint.scheme.as_deref() == Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_kratos_writes() {
        let value = br#"{"id":"a1","name":"hello","version":"v2","metadata":{"zone":"eu"},
            "endpoints":["grpc://10.0.0.1:9000","http://10.0.0.1:8000"],"extra":42}"#;
        let instance = Instance::parse(value).unwrap();
        assert_eq!(instance.name, "hello");
        let endpoints: Vec<_> = instance.endpoints().into_iter().map(Result::unwrap).collect();
        assert_eq!(endpoints[0].scheme.as_deref(), Some("grpc"));
        assert_eq!(endpoints[1].port, Some(8000));
        assert_eq!(
            endpoints[0].metadata,
            [
                ("instance-id".to_owned(), "a1".to_owned()),
                ("version".to_owned(), "v2".to_owned()),
                ("zone".to_owned(), "eu".to_owned())
            ]
        );
    }

    #[test]
    fn accepts_null_metadata_and_missing_fields() {
        let instance =
            Instance::parse(br#"{"id":"x","name":"hello","metadata":null,"endpoints":null}"#).unwrap();
        assert!(instance.metadata.is_empty() && instance.endpoints.is_empty());
        assert!(Instance::parse(b"{}").is_ok());
    }

    #[test]
    fn legacy_is_secure_suffix() {
        let scheme = |url: &str| parse_endpoint(url).unwrap().scheme.unwrap();
        assert_eq!(scheme("http://10.0.0.1:8000?isSecure=true"), "https");
        assert_eq!(scheme("grpc://10.0.0.1:9000?isSecure=true"), "grpcs");
        assert_eq!(scheme("http://10.0.0.1:8000?isSecure=false"), "http");
        assert_eq!(scheme("http://10.0.0.1:8000"), "http");
        assert_eq!(
            parse_endpoint("http://10.0.0.1:8000?isSecure=true").unwrap().port,
            Some(8000)
        );
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"{\"endpoints\":[1]}",
            b"\xff\xfe",
            b"",
        ] {
            assert!(Instance::parse(bad).is_err());
        }
        assert!(parse_endpoint("10.0.0.1:80").is_err());
        assert!(parse_endpoint("http://").is_err());
    }

    #[test]
    fn round_trips() {
        let instance = Instance {
            id: "i".into(),
            name: "n".into(),
            version: String::new(),
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            endpoints: vec!["http://127.0.0.1:1".into()],
        };
        assert_eq!(Instance::parse(&instance.to_json()).unwrap(), instance);
    }
}
