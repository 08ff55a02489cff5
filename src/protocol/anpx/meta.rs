//! The meta JSON of requests (`http_meta`) and responses (`resp_meta`),
//! PROTOCOL.md §4, plus the `exact` extension keys of §7.
//!
//! Encoding keeps `headers`/`query` in the caller's order. Decoding accepts
//! any valid JSON (the reference escapes non-ASCII as `\uXXXX`), ignores
//! unknown keys (that is how extensions travel past reference peers) and
//! collapses duplicate object keys the way the reference's Python `dict`
//! does: first position, last value.

use std::collections::HashMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::MetaError;

/// `http_meta`. `raw_target` and `header_list` belong to the `exact`
/// extension (§7): when present they win over `path`/`query`/`headers`, and
/// they are left out of the JSON when `None` so a plain-v1 peer sees the
/// reference's four keys only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMeta {
    pub method: String,
    /// Percent-decoded path without the query (§4).
    pub path: String,
    #[serde(default, serialize_with = "ser_flat", deserialize_with = "de_flat")]
    pub headers: Vec<(String, String)>,
    #[serde(default, serialize_with = "ser_flat", deserialize_with = "de_flat")]
    pub query: Vec<(String, String)>,
    /// The request-target exactly as received; see [`latin1_to_string`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_target: Option<String>,
    /// Header lines in order, duplicates kept, as `[["name","value"], …]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_list: Option<Vec<(String, String)>>,
}

/// `resp_meta`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResponseMeta {
    pub status: u16,
    pub reason: String,
    #[serde(serialize_with = "ser_flat")]
    pub headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_list: Option<Vec<(String, String)>>,
}

/// What `resp_meta` may hold before `status` is range-checked: any integer
/// is read so that an out-of-range one gets its own error.
#[derive(Deserialize)]
struct ResponseWire {
    status: u64,
    #[serde(default)]
    reason: String,
    #[serde(default, deserialize_with = "de_flat")]
    headers: Vec<(String, String)>,
    #[serde(default)]
    header_list: Option<Vec<(String, String)>>,
}

impl RequestMeta {
    /// Appends the JSON to `out`.
    pub fn to_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("string-keyed JSON into a Vec cannot fail");
    }

    pub fn from_json(json: &[u8]) -> Result<RequestMeta, MetaError> {
        Ok(serde_json::from_slice(json)?)
    }
}

impl ResponseMeta {
    /// Appends the JSON to `out`.
    pub fn to_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("string-keyed JSON into a Vec cannot fail");
    }

    /// Also refuses a `status` outside 100..=999.
    pub fn from_json(json: &[u8]) -> Result<ResponseMeta, MetaError> {
        let wire: ResponseWire = serde_json::from_slice(json)?;
        let status = u16::try_from(wire.status)
            .ok()
            .filter(|s| (100..=999).contains(s))
            .ok_or(MetaError::Status(wire.status))?;
        Ok(ResponseMeta {
            status,
            reason: wire.reason,
            headers: wire.headers,
            header_list: wire.header_list,
        })
    }
}

/// Maps each byte to the char U+00XX, so any byte string (a raw
/// request-target, a non-UTF-8 header value) survives a trip through JSON.
pub fn latin1_to_string(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// Inverse of [`latin1_to_string`]; `None` if a char is above U+00FF.
pub fn string_to_latin1(s: &str) -> Option<Vec<u8>> {
    s.chars().map(|c| u8::try_from(c).ok()).collect()
}

fn ser_flat<S: Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

fn de_flat<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    d.deserialize_map(FlatVisitor)
}

/// Reads a flat JSON object into pairs in document order.
struct FlatVisitor;

impl<'de> Visitor<'de> for FlatVisitor {
    type Value = Vec<(String, String)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a flat JSON object of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        while let Some((key, value)) = map.next_entry::<String, Scalar>()? {
            match seen.get(&key) {
                // Python dict semantics: a repeated key keeps its first
                // position and takes the last value.
                Some(&i) => pairs[i].1 = value.0,
                None => {
                    seen.insert(key.clone(), pairs.len());
                    pairs.push((key, value.0));
                }
            }
        }
        Ok(pairs)
    }
}

/// A JSON scalar as text: strings as they are, numbers/booleans/null as
/// their JSON spelling (tolerated from lax peers). Arrays and objects are
/// refused.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(Scalar(s)),
            v @ (serde_json::Value::Number(_)
            | serde_json::Value::Bool(_)
            | serde_json::Value::Null) => Ok(Scalar(v.to_string())),
            _ => Err(D::Error::custom(
                "expected a string value, found array or object",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn request_round_trip_keeps_order_and_omits_exact_keys() {
        let m = RequestMeta {
            method: "POST".into(),
            path: "/a b/测试".into(),
            headers: pairs(&[("z", "1"), ("a", "2")]),
            query: pairs(&[("q", "x")]),
            raw_target: None,
            header_list: None,
        };
        let mut out = Vec::new();
        m.to_json(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.find("\"z\"").unwrap() < text.find("\"a\"").unwrap());
        assert!(!text.contains("raw_target") && !text.contains("header_list"));
        assert_eq!(RequestMeta::from_json(&out).unwrap(), m);
    }

    #[test]
    fn exact_fields_round_trip_with_duplicates() {
        let m = RequestMeta {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![],
            query: vec![],
            raw_target: Some(latin1_to_string(b"/%7e?a=1&a=2\xff")),
            header_list: Some(pairs(&[("Set-Cookie", "a"), ("Set-Cookie", "b")])),
        };
        let mut out = Vec::new();
        m.to_json(&mut out);
        let back = RequestMeta::from_json(&out).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            string_to_latin1(back.raw_target.as_deref().unwrap()).unwrap(),
            b"/%7e?a=1&a=2\xff"
        );
    }

    #[test]
    fn decodes_escapes_scalars_duplicates_and_unknown_keys() {
        let json = br#"{"method":"PUT","path":"/\u6d4b","extra":[1],
            "headers":{"a":"1","n":5,"b":true,"a":"3","z":null},"query":{}}"#;
        let m = RequestMeta::from_json(json).unwrap();
        assert_eq!(m.path, "/测");
        assert_eq!(
            m.headers,
            pairs(&[("a", "3"), ("n", "5"), ("b", "true"), ("z", "null")])
        );
        let nested = br#"{"method":"GET","path":"/","headers":{"a":{"b":"c"}}}"#;
        assert_eq!(
            RequestMeta::from_json(nested).unwrap_err().kind(),
            "meta json"
        );
        assert_eq!(
            RequestMeta::from_json(b"{\"path\":\"/\"}")
                .unwrap_err()
                .kind(),
            "meta json"
        );
    }

    #[test]
    fn response_status_range() {
        for (status, ok) in [
            (99u64, false),
            (100, true),
            (999, true),
            (1000, false),
            (70000, false),
        ] {
            let json = format!(r#"{{"status":{status},"reason":"R","headers":{{}}}}"#);
            let r = ResponseMeta::from_json(json.as_bytes());
            assert_eq!(r.is_ok(), ok, "status {status}");
            if !ok {
                assert_eq!(r.unwrap_err(), MetaError::Status(status));
            }
        }
        assert!(ResponseMeta::from_json(br#"{"status":-1,"headers":{}}"#).is_err());
    }

    #[test]
    fn latin1_helpers() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(string_to_latin1(&latin1_to_string(&all)).unwrap(), all);
        assert_eq!(string_to_latin1("é"), Some(vec![0xE9]));
        assert_eq!(string_to_latin1("Ā"), None);
    }
}
