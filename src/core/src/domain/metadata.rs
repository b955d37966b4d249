//! Job context arrives camelCase from schedulers and reaches agents as snake_case metadata.

use serde_json::{Map, Value};

/// `customerName` → `customer_name`, `dueDateISO` → `due_date_iso`, `already_snake` unchanged.
pub fn camel_to_snake(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let mut out = String::with_capacity(key.len() + 4);
    for (i, c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev_lower =
                i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            let prev_upper = i > 0 && chars[i - 1].is_uppercase();
            if i > 0 && chars[i - 1] != '_' && (prev_lower || (prev_upper && next_lower)) {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else if *c == '-' || *c == ' ' {
            out.push('_');
        } else {
            out.push(*c);
        }
    }
    out
}

/// Converts every object key in `value`, recursively, to snake_case.
pub fn snake_case_keys(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (camel_to_snake(k), snake_case_keys(v)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(snake_case_keys).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_keys_recursively() {
        assert_eq!(camel_to_snake("customerName"), "customer_name");
        assert_eq!(camel_to_snake("dueDateISO"), "due_date_iso");
        assert_eq!(camel_to_snake("HTTPStatus"), "http_status");
        assert_eq!(camel_to_snake("amount2Pay"), "amount2_pay");
        assert_eq!(camel_to_snake("already_snake"), "already_snake");
        let v = json!({"customerName": "Ada", "invoice": {"amountDue": 12, "lineItems": [{"skuId": 1}]}});
        assert_eq!(
            snake_case_keys(&v),
            json!({"customer_name": "Ada", "invoice": {"amount_due": 12, "line_items": [{"sku_id": 1}]}})
        );
    }
}
