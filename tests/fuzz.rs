//! Property tests over untrusted input: client frames, publication payloads, channel names and request heads.
//! Whatever the bytes, the code answers with a documented refusal and never panics.

use _fastws::error::ErrorCode;
use _fastws::handshake::{self, Route};
use _fastws::protocol::{self, Origin};
use proptest::prelude::*;

/// JSON-ish text: random structure made of the characters that matter to a JSON parser.
fn jsonish() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just("[".to_owned()),
            Just("]".to_owned()),
            Just(",".to_owned()),
            Just(":".to_owned()),
            Just("\"event\"".to_owned()),
            Just("\"data\"".to_owned()),
            Just("\"channel\"".to_owned()),
            Just("\"subscribe\"".to_owned()),
            Just("\"publish\"".to_owned()),
            Just("\"payload\"".to_owned()),
            Just("\\u0000".to_owned()),
            "[a-z0-9]{0,6}".prop_map(|s| format!("\"{s}\"")),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<String>(),
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_never_panics_and_refuses_with_a_documented_code(text in prop_oneof![any::<String>(), jsonish()]) {
        if let Err(refusal) = protocol::decode(&text) {
            prop_assert!(matches!(refusal.code, ErrorCode::Malformed | ErrorCode::UnknownEvent));
            prop_assert!(!refusal.message.is_empty());
        }
    }

    #[test]
    fn channel_names_are_accepted_only_when_valid(name in any::<String>()) {
        let valid = !name.is_empty()
            && name.len() <= 200
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;:".contains(&b));
        prop_assert_eq!(protocol::validate_channel_name(&name).is_ok(), valid);
    }

    #[test]
    fn publications_are_valid_json_or_refused(payload in prop_oneof![any::<String>(), jsonish()], client in any::<bool>()) {
        let origin = if client { Origin::Client } else { Origin::Server };
        if let Ok(frame) = protocol::encode_publication("c", &payload, origin) {
            let value: serde_json::Value = serde_json::from_str(frame.as_str()).expect("a publication frame is JSON");
            prop_assert_eq!(&value["channel"], "c");
            if client {
                let event = value["event"].as_str().unwrap_or_default();
                prop_assert!(event == "message" || event.starts_with("client-"), "forged event {}", event);
            }
        }
    }

    #[test]
    fn routing_arbitrary_requests_never_panics(
        method in "[A-Z]{0,8}",
        path in "/[ -~]{0,30}",
        headers in proptest::collection::vec(("[a-z-]{1,20}", "[ -~]{0,40}"), 0..10),
    ) {
        let request = handshake::ConnectRequest {
            method,
            path,
            query: String::new(),
            headers,
            remote_addr: "127.0.0.1:1".parse().unwrap(),
        };
        if let Ok(Route::Upgrade { accept_key }) = handshake::route(&request) {
            prop_assert_eq!(accept_key.len(), 28);
        }
    }
}
