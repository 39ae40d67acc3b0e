//! AMQP topic patterns, as a topic exchange matches them: words separated by `.`,
//! `*` matches exactly one word, `#` matches zero or more words.

/// A tenant's permission to publish to the topics one pattern matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    words: Vec<String>,
    raw: String,
}

impl TopicPattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("a topic pattern must not be empty".to_owned());
        }
        if raw.len() > 255 {
            return Err(format!("topic pattern {raw:?} is longer than 255 bytes"));
        }
        let words: Vec<String> = raw.split('.').map(str::to_owned).collect();
        for word in &words {
            if word.len() > 1 && (word.contains('*') || word.contains('#')) {
                return Err(format!(
                    "topic pattern {raw:?}: `*` and `#` stand for whole words (e.g. `orders.*`, `ml.#`)"
                ));
            }
        }
        Ok(Self {
            words,
            raw: raw.to_owned(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `topic` (a routing key) is matched.
    pub fn matches(&self, topic: &str) -> bool {
        let topic: Vec<&str> = topic.split('.').collect();
        matches(&self.words, &topic)
    }
}

fn matches(pattern: &[String], topic: &[&str]) -> bool {
    match pattern.split_first() {
        None => topic.is_empty(),
        Some((first, rest)) if first == "#" => {
            // Zero or more words: try every split, shortest first.
            (0..=topic.len()).any(|skip| matches(rest, &topic[skip..]))
        }
        Some((first, rest)) => match topic.split_first() {
            Some((word, more)) if first == "*" || first == word => matches(rest, more),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(pattern: &str, topic: &str) -> bool {
        TopicPattern::parse(pattern).unwrap().matches(topic)
    }

    #[test]
    fn star_is_exactly_one_word() {
        assert!(allows("predictions.*", "predictions.churn"));
        assert!(!allows("predictions.*", "predictions"));
        assert!(!allows("predictions.*", "predictions.churn.v2"));
        assert!(!allows("predictions.*", "other.churn"));
    }

    #[test]
    fn hash_is_zero_or_more_words() {
        assert!(allows("ml.#", "ml"));
        assert!(allows("ml.#", "ml.a"));
        assert!(allows("ml.#", "ml.a.b.c"));
        assert!(!allows("ml.#", "mlx.a"));
        assert!(allows("#", "anything.at.all"));
        assert!(allows("a.#.z", "a.z"));
        assert!(allows("a.#.z", "a.b.c.z"));
        assert!(!allows("a.#.z", "a.b.c"));
        assert!(allows("*.#", "x"));
    }

    #[test]
    fn literal_words_match_exactly() {
        assert!(allows("orders.created", "orders.created"));
        assert!(!allows("orders.created", "orders.created.v2"));
        assert!(!allows("orders.created", "Orders.created"));
    }

    #[test]
    fn wildcards_inside_words_are_refused() {
        assert!(TopicPattern::parse("ml.pred*").is_err());
        assert!(TopicPattern::parse("ml#").is_err());
        assert!(TopicPattern::parse("").is_err());
    }
}
