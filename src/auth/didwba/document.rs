//! Looking things up in a DID document (a `serde_json::Value`): a
//! verification method by id, and whether a relationship
//! (`authentication`, `assertionMethod`) authorises it — the same searches
//! anp 1.0.7's `_find_verification_method` and
//! `_is_verification_method_authorized_in_document` make. Ids written
//! relative (`#key-1`) match their absolute form.

use serde_json::Value;

fn id_matches(candidate: &str, did: &str, id: &str) -> bool {
    candidate == id
        || candidate.strip_prefix('#').is_some_and(|frag| {
            id.strip_prefix(did).and_then(|r| r.strip_prefix('#')) == Some(frag)
        })
}

fn entries<'d>(doc: &'d Value, key: &str) -> impl Iterator<Item = &'d Value> {
    doc.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter())
        .into_iter()
        .flatten()
}

/// The document's `id`, if it is a string.
pub fn doc_id(doc: &Value) -> Option<&str> {
    doc.get("id").and_then(Value::as_str)
}

/// The verification method `id` (`did#fragment`): in `verificationMethod`,
/// else embedded in `authentication` or `assertionMethod`.
pub fn find_method<'d>(doc: &'d Value, id: &str) -> Option<&'d Value> {
    let did = doc_id(doc).unwrap_or("");
    let by_id = |v: &&'d Value| {
        v.get("id")
            .and_then(Value::as_str)
            .is_some_and(|c| id_matches(c, did, id))
    };
    entries(doc, "verificationMethod")
        .find(by_id)
        .or_else(|| entries(doc, "authentication").find(by_id))
        .or_else(|| entries(doc, "assertionMethod").find(by_id))
}

/// Whether `relationship` lists `id` (as a reference or embedded).
pub fn is_authorized(doc: &Value, relationship: &str, id: &str) -> bool {
    let did = doc_id(doc).unwrap_or("");
    entries(doc, relationship).any(|e| match e {
        Value::String(s) => id_matches(s, did, id),
        Value::Object(_) => e
            .get("id")
            .and_then(Value::as_str)
            .is_some_and(|c| id_matches(c, did, id)),
        _ => false,
    })
}

/// Ids of the methods `relationship` lists, in order (absolute form).
pub fn authorized_ids(doc: &Value, relationship: &str) -> Vec<String> {
    let did = doc_id(doc).unwrap_or("");
    entries(doc, relationship)
        .filter_map(|e| match e {
            Value::String(s) => Some(s.as_str()),
            Value::Object(_) => e.get("id").and_then(Value::as_str),
            _ => None,
        })
        .map(|s| match s.strip_prefix('#') {
            Some(frag) => format!("{did}#{frag}"),
            None => s.to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_authorises() {
        let doc = serde_json::json!({
            "id": "did:wba:a.example",
            "verificationMethod": [{"id": "did:wba:a.example#key-1", "type": "X"}],
            "authentication": ["#key-1", {"id": "did:wba:a.example#key-9", "type": "Y"}],
            "assertionMethod": ["did:wba:a.example#key-1"]
        });
        assert_eq!(
            find_method(&doc, "did:wba:a.example#key-1").unwrap()["type"],
            "X"
        );
        assert_eq!(
            find_method(&doc, "did:wba:a.example#key-9").unwrap()["type"],
            "Y"
        );
        assert!(find_method(&doc, "did:wba:a.example#key-2").is_none());
        assert!(is_authorized(
            &doc,
            "authentication",
            "did:wba:a.example#key-1"
        ));
        assert!(is_authorized(
            &doc,
            "authentication",
            "did:wba:a.example#key-9"
        ));
        assert!(!is_authorized(
            &doc,
            "keyAgreement",
            "did:wba:a.example#key-1"
        ));
        assert_eq!(
            authorized_ids(&doc, "authentication"),
            ["did:wba:a.example#key-1", "did:wba:a.example#key-9"]
        );
    }
}
