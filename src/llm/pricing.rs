//! Cost of a response: tokens × the `pricing` of the model (USD per
//! million tokens), the `default` entry for models not listed.

use std::collections::HashMap;

use crate::snapshot::Price;

/// USD for the tokens, or `None` when neither the model nor `default` is
/// priced.
pub fn cost(
    pricing: &HashMap<String, Price>,
    model: Option<&str>,
    input: u64,
    output: u64,
) -> Option<f64> {
    let price = model
        .and_then(|m| pricing.get(m))
        .or_else(|| pricing.get("default"))?;
    Some((input as f64 * price.input + output as f64 * price.output) / 1_000_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_price_else_default() {
        let p = HashMap::from([
            (
                "gpt-4o-mini".to_owned(),
                Price {
                    input: 0.15,
                    output: 0.60,
                },
            ),
            (
                "default".to_owned(),
                Price {
                    input: 1.0,
                    output: 3.0,
                },
            ),
        ]);
        let c = cost(&p, Some("gpt-4o-mini"), 1_000_000, 2_000_000).unwrap();
        assert!((c - 1.35).abs() < 1e-9);
        let d = cost(&p, Some("unknown"), 1_000, 1_000).unwrap();
        assert!((d - 0.004).abs() < 1e-12);
        assert_eq!(cost(&HashMap::new(), Some("x"), 1, 1), None);
    }
}
