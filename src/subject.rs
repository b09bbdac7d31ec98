//! NATS subjects and subject patterns with NATS's exact wildcard semantics:
//! tokens are separated by `.`, no token is empty, `*` matches exactly one
//! token, `>` matches one or more tokens and may only be the last token. A
//! `*` or `>` that is part of a longer token (`foo*`) is a literal.

use crate::error::{Error, Result};

/// A validated subject pattern (a subject is a pattern without wildcards).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectPattern {
    text: String,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Token {
    Literal(Vec<u8>),
    Single,
    Tail,
}

impl SubjectPattern {
    /// Parses and validates a pattern.
    pub fn parse(text: &str) -> Result<SubjectPattern> {
        let invalid =
            |reason: &str| Error::InvalidInput(format!("subject pattern '{text}': {reason}"));
        if text.is_empty() {
            return Err(invalid("is empty"));
        }
        if text
            .bytes()
            .any(|byte| byte.is_ascii_whitespace() || byte.is_ascii_control())
        {
            return Err(invalid("contains whitespace or control characters"));
        }
        let parts: Vec<&str> = text.split('.').collect();
        let mut tokens = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let token = match *part {
                "" => return Err(invalid("has an empty token")),
                "*" => Token::Single,
                ">" if index + 1 == parts.len() => Token::Tail,
                ">" => return Err(invalid("'>' may only be the last token")),
                literal => Token::Literal(literal.as_bytes().to_vec()),
            };
            tokens.push(token);
        }
        Ok(SubjectPattern {
            text: text.to_string(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the pattern has no wildcard token.
    pub fn is_literal(&self) -> bool {
        self.tokens
            .iter()
            .all(|token| matches!(token, Token::Literal(_)))
    }

    /// Does `subject` (a concrete subject) match this pattern?
    pub fn matches(&self, subject: &[u8]) -> bool {
        let mut rest = subject;
        let mut tokens = self.tokens.iter().peekable();
        while let Some(token) = tokens.next() {
            if rest.is_empty() {
                return false;
            }
            let (head, tail, more) = match memchr::memchr(b'.', rest) {
                Some(dot) => (&rest[..dot], &rest[dot + 1..], true),
                None => (rest, &rest[rest.len()..], false),
            };
            if head.is_empty() {
                return false;
            }
            match token {
                Token::Tail => return !has_empty_token(rest),
                Token::Single => {}
                Token::Literal(literal) => {
                    if literal.as_slice() != head {
                        return false;
                    }
                }
            }
            if more && tail.is_empty() {
                return false;
            }
            rest = tail;
            if !more {
                return tokens.peek().is_none();
            }
        }
        rest.is_empty()
    }

    /// Could one subject match both patterns?
    pub fn overlaps(&self, other: &SubjectPattern) -> bool {
        overlap(&self.tokens, &other.tokens)
    }

    /// Is every subject this pattern matches also matched by `other`?
    pub fn is_subset_of(&self, other: &SubjectPattern) -> bool {
        subset(&self.tokens, &other.tokens)
    }
}

fn has_empty_token(subject: &[u8]) -> bool {
    subject.split(|byte| *byte == b'.').any(<[u8]>::is_empty)
}

fn overlap(left: &[Token], right: &[Token]) -> bool {
    match (left.first(), right.first()) {
        (None, None) => true,
        (Some(Token::Tail), Some(_)) | (Some(_), Some(Token::Tail)) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(a), Some(b)) => {
            let compatible = match (a, b) {
                (Token::Literal(x), Token::Literal(y)) => x == y,
                _ => true,
            };
            compatible && overlap(&left[1..], &right[1..])
        }
    }
}

fn subset(inner: &[Token], outer: &[Token]) -> bool {
    match (inner.first(), outer.first()) {
        (None, None) => true,
        (Some(_), Some(Token::Tail)) => true,
        (Some(Token::Tail), Some(_)) => false,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(a), Some(b)) => {
            let covered = match (a, b) {
                (_, Token::Single) => true,
                (Token::Literal(x), Token::Literal(y)) => x == y,
                _ => false,
            };
            covered && subset(&inner[1..], &outer[1..])
        }
    }
}

impl std::fmt::Display for SubjectPattern {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.text)
    }
}

impl std::str::FromStr for SubjectPattern {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        SubjectPattern::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, subject: &str) -> bool {
        SubjectPattern::parse(pattern)
            .unwrap()
            .matches(subject.as_bytes())
    }

    #[test]
    fn nats_wildcard_semantics() {
        assert!(matches("foo", "foo"));
        assert!(!matches("foo", "foo.bar"));
        assert!(!matches("foo.bar", "foo"));
        assert!(matches("foo.*", "foo.bar"));
        assert!(!matches("foo.*", "foo"));
        assert!(!matches("foo.*", "foo.bar.baz"));
        assert!(matches("foo.>", "foo.bar"));
        assert!(matches("foo.>", "foo.bar.baz"));
        assert!(!matches("foo.>", "foo"));
        assert!(matches(">", "foo"));
        assert!(matches(">", "a.b.c"));
        assert!(matches("*", "foo"));
        assert!(!matches("*", "foo.bar"));
        assert!(matches("*.b.>", "a.b.c.d"));
        assert!(!matches("*.b.>", "a.c.c.d"));
        assert!(matches("foo*", "foo*"), "a partial wildcard is a literal");
        assert!(!matches("foo*", "foobar"));
        assert!(!matches("foo.*", "foo."), "empty token");
        assert!(!matches("foo.>", "foo..bar"), "empty token");
        assert!(!matches("*", ""));
    }

    #[test]
    fn invalid_patterns_are_rejected_with_a_reason() {
        for bad in [
            "",
            "foo..bar",
            ".foo",
            "foo.",
            "foo.>.bar",
            "foo bar",
            "a.\tb",
        ] {
            let error = SubjectPattern::parse(bad).unwrap_err().to_string();
            assert!(error.contains("subject pattern"), "{bad}: {error}");
        }
    }

    #[test]
    fn overlap_and_subset() {
        let parse = |text: &str| SubjectPattern::parse(text).unwrap();
        assert!(parse("orders.>").overlaps(&parse("orders.eu")));
        assert!(parse("orders.*").overlaps(&parse("*.eu")));
        assert!(!parse("orders.*").overlaps(&parse("orders.eu.x")));
        assert!(!parse("orders.>").overlaps(&parse("orders")));
        assert!(!parse("a.b").overlaps(&parse("a.c")));
        assert!(parse(">").overlaps(&parse("x.y")));
        assert!(parse("orders.eu").is_subset_of(&parse("orders.*")));
        assert!(parse("orders.*").is_subset_of(&parse("orders.>")));
        assert!(!parse("orders.>").is_subset_of(&parse("orders.*")));
        assert!(!parse("*.eu").is_subset_of(&parse("orders.*")));
    }
}
