//! The `OpenAPI` document must describe every route (with its scope) and every wire type (with
//! every field the type serialises).

use paddock_broker::{
    server::routes::ROUTES,
    wire::{self, *},
};
use serde::Serialize;
use serde_yaml_ng::Value;

fn doc() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml");
    serde_yaml_ng::from_str(&text).expect("valid YAML")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["components"]["schemas"][name];
    assert!(!s.is_null(), "schema {name} missing from openapi.yaml");
    s
}

/// Every key the type serialises must be a declared property, and every declared property
/// must be a field of the type.
fn check_fields<T: Serialize>(doc: &Value, name: &str, sample: &T) {
    let json = serde_json::to_value(sample).expect("serialise");
    let obj = json.as_object().expect("object");
    let props = schema(doc, name)["properties"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{name} has no properties"));
    for key in obj.keys() {
        assert!(
            props.contains_key(Value::from(key.as_str())),
            "{name}.{key} not documented"
        );
    }
    for key in props.keys() {
        let key = key.as_str().expect("string key");
        assert!(
            obj.contains_key(key),
            "{name}.{key} documented but not a field"
        );
    }
}

#[test]
fn every_route_is_documented_with_its_scope() {
    let doc = doc();
    for route in ROUTES {
        let op = &doc["paths"][route.path][route.method.to_ascii_lowercase().as_str()];
        assert!(!op.is_null(), "{} {} missing", route.method, route.path);
        let scope = route.scope.expect("scope").as_str();
        assert_eq!(
            op["x-paddock-scope"].as_str(),
            Some(scope),
            "{} scope",
            route.path
        );
    }
    let documented = doc["paths"].as_mapping().expect("paths").len();
    assert_eq!(
        documented,
        ROUTES.len(),
        "document lists routes the server does not have"
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one sample per wire type")]
fn every_wire_type_and_field_is_documented() {
    let doc = doc();
    for name in wire::SCHEMA_NAMES {
        schema(&doc, name);
    }
    let codes: Vec<&str> = schema(&doc, "ErrorCode")["enum"]
        .as_sequence()
        .expect("enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for code in ErrorCode::ALL {
        assert!(
            codes.contains(&code.as_str()),
            "error code {code} not documented"
        );
    }
    assert_eq!(codes.len(), ErrorCode::ALL.len());
    let s = String::new;
    let header = Header {
        name: s(),
        value: s(),
    };
    let query = QueryParam {
        name: s(),
        value: s(),
    };
    let basic = BasicAuth {
        username: s(),
        password: s(),
    };
    let lease = LeaseInfo {
        lease_id: s(),
        run: s(),
        namespace: s(),
        credential: s(),
        provider: s(),
        delivery: DeliveryMode::ProxyInjected,
        hosts: vec![],
        pool_slot: None,
        issued_at: 0,
        expires_at: 0,
        revoked: false,
    };
    check_fields(
        &doc,
        "ErrorBody",
        &ErrorBody {
            code: ErrorCode::Internal,
            message: s(),
        },
    );
    check_fields(
        &doc,
        "IssueRequest",
        &IssueRequest {
            run: s(),
            credential: s(),
        },
    );
    check_fields(
        &doc,
        "IssueResponse",
        &IssueResponse {
            lease_id: s(),
            run: s(),
            credential: s(),
            provider: s(),
            delivery: DeliveryMode::InContainer,
            value: s(),
            hosts: vec![],
            expires_at: 0,
        },
    );
    check_fields(&doc, "RenewRequest", &RenewRequest { lease_id: s() });
    check_fields(
        &doc,
        "RenewResponse",
        &RenewResponse {
            lease_id: s(),
            expires_at: 0,
        },
    );
    check_fields(&doc, "RevokeRequest", &RevokeRequest { lease_id: s() });
    check_fields(
        &doc,
        "RevokeResponse",
        &RevokeResponse {
            lease_id: s(),
            revoked: true,
        },
    );
    check_fields(
        &doc,
        "ValidateEgressRequest",
        &ValidateEgressRequest {
            run: s(),
            pod: Some(s()),
            host: s(),
            port: Some(1),
        },
    );
    check_fields(
        &doc,
        "ValidateEgressResponse",
        &ValidateEgressResponse {
            allowed: true,
            substitute_auth: false,
            discovery: false,
            passthrough: true,
            policy: None,
            reason: s(),
        },
    );
    check_fields(&doc, "Header", &header);
    check_fields(&doc, "QueryParam", &query);
    check_fields(&doc, "BasicAuth", &basic);
    check_fields(
        &doc,
        "SubstituteAuthRequest",
        &SubstituteAuthRequest {
            run: s(),
            pod: Some(s()),
            host: s(),
            port: 1,
            transport: paddock_broker::wire::Transport::Tls,
            method: s(),
            path: s(),
            query: None,
            headers: vec![header.clone()],
            subscription: Some(s()),
        },
    );
    check_fields(
        &doc,
        "SubstituteAuthResponse",
        &SubstituteAuthResponse {
            matched: true,
            lease_id: None,
            credential: None,
            set_headers: vec![header],
            remove_headers: vec![],
            set_query: vec![query],
            remove_query: vec![],
            basic_auth: Some(basic),
            secrets: vec![s()],
            grant: Some(GrantTerms {
                seq: 1,
                uses: 1,
                ttl_ms: 1,
            }),
        },
    );
    check_fields(
        &doc,
        "GrantTerms",
        &GrantTerms {
            seq: 1,
            uses: 1,
            ttl_ms: 1,
        },
    );
    check_fields(
        &doc,
        "GrantPollRequest",
        &GrantPollRequest {
            subscription: Some(s()),
            acked: 1,
        },
    );
    let event = GrantEvent {
        seq: 1,
        scope: InvalidationScope::Lease {
            lease_id: s(),
            run: s(),
        },
    };
    check_fields(&doc, "GrantEvent", &event);
    check_fields(&doc, "InvalidationScope", &event.scope);
    check_fields(
        &doc,
        "GrantPollResponse",
        &GrantPollResponse {
            subscription: s(),
            seq: 1,
            events: vec![event.clone()],
            lease_ms: 1,
        },
    );
    check_fields(
        &doc,
        "NodeCaRequest",
        &NodeCaRequest {
            node: s(),
            csr: s(),
        },
    );
    check_fields(
        &doc,
        "NodeCaResponse",
        &NodeCaResponse {
            certificate: s(),
            root: s(),
            not_before: 1,
            not_after: 2,
        },
    );
    check_fields(&doc, "LeaseInfo", &lease);
    check_fields(
        &doc,
        "LeasesResponse",
        &LeasesResponse {
            leases: vec![lease],
        },
    );
    check_fields(
        &doc,
        "RunUpsertRequest",
        &RunUpsertRequest {
            run: s(),
            namespace: s(),
            template: s(),
            phase: RunPhase::Running,
        },
    );
    check_fields(
        &doc,
        "RunInfo",
        &RunInfo {
            run: s(),
            namespace: s(),
            template: s(),
            phase: RunPhase::Failed,
        },
    );
    check_fields(&doc, "PingResponse", &PingResponse { store: s() });
}
