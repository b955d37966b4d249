//! LiveKit's Twirp server writes JSON with `EmitUnpopulated` (livekit-facts.md §4): every
//! field appears, zero values included. pbjson omits them, so responses are completed here
//! from a table generated from livekit-protocol (`scripts/gen-emulator-unpopulated`).

use serde_json::{Map, Value};

use crate::unpopulated_table::MESSAGES;

/// A field's protojson zero value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Zero {
    Str,
    Number,
    /// 64-bit integers are strings in protojson.
    Int64,
    False,
    /// An unset message field.
    Null,
    List,
    Map,
    /// The enum's zero value, by name.
    Enum(&'static str),
}

#[derive(Debug)]
pub(crate) struct Field {
    pub name: &'static str,
    pub zero: Zero,
    /// For message fields (single or repeated): the message, to complete it too.
    pub message: Option<&'static str>,
}

fn zero_value(zero: Zero) -> Value {
    match zero {
        Zero::Str => Value::String(String::new()),
        Zero::Number => Value::from(0),
        Zero::Int64 => Value::String("0".into()),
        Zero::False => Value::Bool(false),
        Zero::Null => Value::Null,
        Zero::List => Value::Array(Vec::new()),
        Zero::Map => Value::Object(Map::new()),
        Zero::Enum(name) => Value::String(name.into()),
    }
}

/// The table's name for a top-level Rust message type (`livekit_protocol::…::Room` → `Room`).
pub(crate) fn message_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Adds every missing field of `message` (recursively) with its zero value.
pub(crate) fn fill(message: &str, value: &mut Value) {
    let Some((_, fields)) = MESSAGES.iter().find(|(name, _)| *name == message) else {
        return;
    };
    let Value::Object(object) = value else {
        return;
    };
    for field in fields.iter() {
        let entry = object
            .entry(field.name)
            .or_insert_with(|| zero_value(field.zero));
        if let Some(nested) = field.message {
            match entry {
                Value::Array(items) => items.iter_mut().for_each(|item| fill(nested, item)),
                item @ Value::Object(_) => fill(nested, item),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_protocol as proto;

    #[test]
    fn zero_values_are_written_as_protojson_does() {
        let room = proto::Room {
            name: "r".into(),
            ..Default::default()
        };
        let mut value = serde_json::json!({"name": "r"});
        fill(message_name::<proto::Room>(), &mut value);
        assert_eq!(value["name"], "r");
        assert_eq!(value["sid"], "");
        assert_eq!(value["empty_timeout"], 0);
        assert_eq!(value["creation_time"], "0", "int64 as a string");
        assert_eq!(value["active_recording"], false);
        assert_eq!(value["enabled_codecs"], serde_json::json!([]));
        assert_eq!(value["version"], Value::Null);
        assert_eq!(room.name, "r");
        let mut participants = serde_json::json!({"participants": [{"identity": "a"}]});
        fill(
            message_name::<proto::ListParticipantsResponse>(),
            &mut participants,
        );
        let p = &participants["participants"][0];
        assert_eq!(p["kind"], "STANDARD");
        assert_eq!(p["state"], "JOINING");
        assert_eq!(p["disconnect_reason"], "UNKNOWN_REASON");
        assert_eq!(p["attributes"], serde_json::json!({}));
    }
}
