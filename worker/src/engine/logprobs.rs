//! Log probabilities from a step's logits: a softmax over the full vocabulary (log-sum-exp,
//! accumulated in f64) for the sampled token and the most likely alternatives. Pure; the
//! engine calls it only for requests that asked for log probabilities.

use llamapool_common::Token;

/// The sampled token's log probability and the `top_n` most likely tokens with theirs, most
/// likely first (the lower id first on ties). Banned tokens (logit −∞) get −∞.
pub fn logprobs(logits: &[f32], token: Token, top_n: usize) -> (f32, Vec<(Token, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // Nothing has a probability (every token banned): report −∞ rather than NaN.
        return (f32::NEG_INFINITY, Vec::new());
    }
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    let log_z = max + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_z) as f32;
    let mut top: Vec<(usize, f32)> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == top_n && l <= top[top_n - 1].1 {
                continue;
            }
            let at = top.partition_point(|&(_, t)| t >= l);
            top.insert(at, (i, l));
            top.truncate(top_n);
        }
    }
    let sampled = usize::try_from(token)
        .ok()
        .and_then(|i| logits.get(i))
        .map_or(f32::NEG_INFINITY, |&l| logprob(l));
    let top = top
        .into_iter()
        .map(|(i, l)| (Token::try_from(i).expect("vocabulary ids fit"), logprob(l)))
        .collect();
    (sampled, top)
}

#[cfg(test)]
mod tests {
    use super::logprobs;

    #[test]
    fn matches_a_hand_computed_softmax() {
        // logits [ln 1, ln 2, ln 3, ln 4, -inf]: probabilities 0.1, 0.2, 0.3, 0.4, 0.
        let logits = [0.0, 2f32.ln(), 3f32.ln(), 4f32.ln(), f32::NEG_INFINITY];
        let (sampled, top) = logprobs(&logits, 1, 3);
        assert!((sampled - 0.2f32.ln()).abs() < 1e-6, "{sampled}");
        let ids: Vec<i32> = top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, [3, 2, 1]);
        for ((_, got), want) in top.iter().zip([0.4f32, 0.3, 0.2]) {
            assert!((got - want.ln()).abs() < 1e-6, "{got} vs ln {want}");
        }
        assert_eq!(logprobs(&logits, 4, 0), (f32::NEG_INFINITY, Vec::new()));
    }

    #[test]
    fn is_stable_for_large_logits_and_breaks_ties_by_id() {
        // Shifting every logit changes nothing; exp(1000) alone would overflow.
        let (sampled, top) = logprobs(&[1000.0, 1000.0, 999.0], 0, 5);
        let z = 1.0 + 1.0 + (-1f64).exp();
        assert!((f64::from(sampled) + z.ln()).abs() < 1e-6);
        assert_eq!(top.len(), 3);
        assert_eq!((top[0].0, top[1].0, top[2].0), (0, 1, 2));
        assert_eq!(top[0].1, top[1].1);
        assert!(top.iter().all(|&(_, l)| l <= 0.0));
    }

    #[test]
    fn every_banned_token_gives_minus_infinity() {
        let (sampled, top) = logprobs(&[f32::NEG_INFINITY; 3], 0, 2);
        assert_eq!(sampled, f32::NEG_INFINITY);
        assert!(top.is_empty());
    }
}
