//! Laravel-style rule strings, as Pterodactyl and Pelican eggs carry them
//! (`required|string|max:20`, `nullable|in:a,b`, `regex:/^\d+$/`), translated into
//! [`VariableRules`].
//!
//! Every token either becomes part of the rules or is returned in
//! [`ParsedRules::unmapped`] with the reason, so a caller can report it: nothing is dropped
//! silently. Tokens that only restate the default (`nullable`, `string`, `sometimes`) map to
//! nothing and are not reported.

use serde::{Deserialize, Serialize};

use crate::variables::{VariableRules, VariableType};

/// A rule token that could not be carried over, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmappedRule {
    pub rule: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedRules {
    pub rules: VariableRules,
    pub unmapped: Vec<UnmappedRule>,
}

/// Parses a `|`-separated rule string. A `regex:` whose pattern contains `|` keeps it (the
/// pattern runs to its closing delimiter).
pub fn parse(text: &str) -> ParsedRules {
    parse_tokens(&split(text))
}

/// Parses rules given as a list (Pelican's PLCN format), one rule per item.
pub fn parse_list(items: &[String]) -> ParsedRules {
    let tokens: Vec<String> = items
        .iter()
        .flat_map(|item| {
            // Some lists still hold `a|b` strings; a regex item is taken whole.
            if item.trim_start().starts_with("regex:") || item.trim_start().starts_with("not_regex:") {
                vec![item.trim().to_string()]
            } else {
                split(item)
            }
        })
        .collect();
    parse_tokens(&tokens)
}

fn split(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut parts = text.split('|');
    while let Some(part) = parts.next() {
        let mut token = part.trim().to_string();
        if let Some(pattern) = token
            .strip_prefix("regex:")
            .or_else(|| token.strip_prefix("not_regex:"))
            && let Some(delim) = pattern.chars().next()
        {
            let mut pattern = pattern.to_string();
            while !closed(&pattern, delim) {
                match parts.next() {
                    Some(more) => {
                        pattern.push('|');
                        pattern.push_str(more);
                    }
                    None => break,
                }
            }
            let name = if token.starts_with("regex:") {
                "regex"
            } else {
                "not_regex"
            };
            token = format!("{name}:{}", pattern.trim());
        }
        if !token.is_empty() {
            out.push(token);
        }
    }
    out
}

/// Whether a delimited pattern (`/.../flags`) has its closing delimiter.
fn closed(pattern: &str, delim: char) -> bool {
    let body = pattern.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    body.len() >= 2 * delim.len_utf8() && body.ends_with(delim) && !body.ends_with(&format!("\\{delim}"))
}

fn parse_tokens(tokens: &[String]) -> ParsedRules {
    let mut rules = VariableRules::default();
    let mut unmapped = Vec::new();
    let mut skip = |rule: &str, reason: &str| {
        unmapped.push(UnmappedRule {
            rule: rule.to_string(),
            reason: reason.to_string(),
        });
    };
    let mut regex_from: Option<String> = None;
    let mut set_regex =
        |rules: &mut VariableRules, token: &str, regex: String, skip: &mut dyn FnMut(&str, &str)| {
            if let Some(first) = &regex_from {
                skip(
                    token,
                    &format!("only one pattern per variable is kept, and {first} came first"),
                );
            } else {
                rules.regex = Some(regex);
                regex_from = Some(token.to_string());
            }
        };
    for token in tokens {
        let (name, arg) = match token.split_once(':') {
            Some((n, a)) => (n.trim(), Some(a)),
            None => (token.trim(), None),
        };
        let int = |a: Option<&str>| a.and_then(|a| a.trim().parse::<i64>().ok());
        let pair = |a: Option<&str>| {
            let (x, y) = a?.split_once(',')?;
            Some((x.trim().parse::<i64>().ok()?, y.trim().parse::<i64>().ok()?))
        };
        match name {
            "required" => rules.required = true,
            "nullable" | "string" | "sometimes" | "present" | "filled" => {}
            "integer" => rules.kind = VariableType::Integer,
            "numeric" => rules.kind = VariableType::Number,
            "boolean" | "bool" => rules.kind = VariableType::Boolean,
            "min" => match int(arg) {
                Some(n) => rules.min = Some(n),
                None => skip(token, "min takes a whole number here"),
            },
            "max" => match int(arg) {
                Some(n) => rules.max = Some(n),
                None => skip(token, "max takes a whole number here"),
            },
            "between" => match pair(arg) {
                Some((a, b)) => {
                    rules.min = Some(a);
                    rules.max = Some(b);
                }
                None => skip(token, "between takes two whole numbers"),
            },
            "size" => match int(arg) {
                Some(n) => {
                    rules.min = Some(n);
                    rules.max = Some(n);
                }
                None => skip(token, "size takes a whole number"),
            },
            "in" => match arg {
                Some(list) => rules.one_of = Some(csv(list)),
                None => skip(token, "in needs a list of values"),
            },
            "regex" => match arg.map(pcre) {
                Some(Ok(re)) => set_regex(&mut rules, token, re, &mut skip),
                Some(Err(reason)) => skip(token, &reason),
                None => skip(token, "regex needs a pattern"),
            },
            "alpha" => set_regex(&mut rules, token, r"[\p{L}\p{M}]+".into(), &mut skip),
            "alpha_num" => set_regex(&mut rules, token, r"[\p{L}\p{M}\p{N}]+".into(), &mut skip),
            "alpha_dash" => set_regex(&mut rules, token, r"[\p{L}\p{M}\p{N}_-]+".into(), &mut skip),
            "url" | "active_url" => set_regex(
                &mut rules,
                token,
                r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+".into(),
                &mut skip,
            ),
            "digits" => match int(arg) {
                Some(n) if n > 0 => set_regex(&mut rules, token, format!("[0-9]{{{n}}}"), &mut skip),
                _ => skip(token, "digits takes a positive whole number"),
            },
            "digits_between" => match pair(arg) {
                Some((a, b)) if 0 <= a && a <= b => {
                    set_regex(&mut rules, token, format!("[0-9]{{{a},{b}}}"), &mut skip);
                }
                _ => skip(
                    token,
                    "digits_between takes two whole numbers, the first not above the second",
                ),
            },
            _ => skip(token, "no equivalent rule"),
        }
    }
    // Laravel's max on a boolean is meaningless, and our rules refuse it.
    if rules.kind == VariableType::Boolean && (rules.min.is_some() || rules.max.is_some()) {
        rules.min = None;
        rules.max = None;
        skip("min/max", "a boolean has no min or max");
    }
    if let (Some(min), Some(max)) = (rules.min, rules.max)
        && min > max
    {
        rules.min = None;
        rules.max = None;
        skip(&format!("min:{min}|max:{max}"), "min is above max");
    }
    if let Some(re) = rules.regex.clone()
        && let Err(e) = (VariableRules {
            regex: Some(re),
            ..VariableRules::default()
        })
        .check_definition()
    {
        rules.regex = None;
        skip(regex_from.as_deref().unwrap_or("regex"), &e);
    }
    ParsedRules { rules, unmapped }
}

/// `a,b,"c,d"` as Laravel's `in:` reads it (str_getcsv).
fn csv(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                current.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    out.push(current);
    out
}

/// A PCRE pattern with delimiters and flags (`/^\d+$/i`) as a Rust regex.
fn pcre(text: &str) -> Result<String, String> {
    let text = text.trim();
    let mut chars = text.chars();
    let open = chars.next().ok_or("an empty pattern")?;
    if open.is_alphanumeric() || open == '\\' || open.is_whitespace() {
        return Err("a PHP pattern starts with a delimiter such as /".into());
    }
    let close = match open {
        '(' => ')',
        '{' => '}',
        '[' => ']',
        '<' => '>',
        c => c,
    };
    let rest = &text[open.len_utf8()..];
    let end = rest.rfind(close).ok_or("the pattern has no closing delimiter")?;
    let (body, flags) = (&rest[..end], &rest[end + close.len_utf8()..]);
    let mut inline = String::new();
    for f in flags.chars() {
        match f {
            'i' | 'm' | 's' | 'x' => inline.push(f),
            'u' | 'D' => {}
            other => return Err(format!("the pattern flag {other} has no equivalent")),
        }
    }
    // PHP's \d, \w and \s are ASCII unless the u flag is set; Rust's are Unicode. Keep the
    // ASCII meaning.
    let body = if flags.contains('u') {
        body.to_string()
    } else {
        format!("(?-u:{body})")
    };
    let body = if inline.is_empty() {
        body
    } else {
        format!("(?{inline}){body}")
    };
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> ParsedRules {
        parse(text)
    }

    #[test]
    fn common_egg_rules() {
        let p = parsed("required|string|max:20");
        assert!(p.unmapped.is_empty());
        assert_eq!(p.rules.kind, VariableType::String);
        assert!(p.rules.required);
        assert_eq!(p.rules.max, Some(20));
        assert!(p.rules.check("latest").is_ok());
        assert!(p.rules.check("").is_err());
        assert!(p.rules.check(&"x".repeat(21)).is_err());

        let p = parsed("nullable|string");
        assert!(!p.rules.required && p.unmapped.is_empty());
        assert!(p.rules.check("").is_ok());

        let p = parsed("required|integer|between:1,100");
        assert_eq!(
            (p.rules.kind, p.rules.min, p.rules.max),
            (VariableType::Integer, Some(1), Some(100))
        );
        assert!(
            p.rules.check("100").is_ok() && p.rules.check("101").is_err() && p.rules.check("1.5").is_err()
        );

        let p = parsed("required|numeric|min:0|max:2");
        assert!(p.rules.check("1.5").is_ok() && p.rules.check("2.5").is_err() && p.rules.check("x").is_err());

        let p = parsed("required|boolean");
        assert!(p.rules.check("1").is_ok() && p.rules.check("yes").is_err());

        let p = parsed("required|string|in:vanilla,paper,\"a,b\"");
        assert_eq!(p.rules.one_of.as_deref().unwrap(), ["vanilla", "paper", "a,b"]);
        assert!(p.rules.check("paper").is_ok() && p.rules.check("forge").is_err());

        let p = parsed("required|string|size:4");
        assert!(p.rules.check("abcd").is_ok() && p.rules.check("abc").is_err());
    }

    #[test]
    fn regexes_keep_their_pipes_flags_and_ascii_meaning() {
        let p = parsed(r"required|regex:/^([\w\d._-]+)(\.jar)$/");
        assert!(p.unmapped.is_empty(), "{:?}", p.unmapped);
        assert!(p.rules.check("server.jar").is_ok());
        assert!(p.rules.check("server.zip").is_err());
        assert!(p.rules.check("sérver.jar").is_err(), "\\w is ASCII as in PHP");

        let p = parsed(r"required|regex:/^(latest|\d+)$/|max:10");
        assert_eq!(p.rules.max, Some(10));
        assert!(
            p.rules.check("latest").is_ok() && p.rules.check("42").is_ok() && p.rules.check("x").is_err()
        );

        let p = parsed(r"regex:/^ABC$/i");
        assert!(p.rules.check("abc").is_ok());

        // Look-around has no equivalent: reported, not dropped silently.
        let p = parsed(r"required|regex:/^(?!x).*$/");
        assert!(p.rules.regex.is_none());
        assert_eq!(p.unmapped.len(), 1);
        assert!(p.unmapped[0].rule.starts_with("regex:"));
    }

    #[test]
    fn shorthand_patterns_and_what_does_not_map() {
        let p = parsed("required|alpha_dash|max:32");
        assert!(p.rules.check("my_server-1").is_ok() && p.rules.check("my server").is_err());
        let p = parsed("nullable|url");
        assert!(p.rules.check("https://example.com/x").is_ok() && p.rules.check("example").is_err());
        let p = parsed("required|digits_between:4,6");
        assert!(p.rules.check("1234").is_ok() && p.rules.check("123").is_err());
        let p = parsed("required|alpha_dash|regex:/^a/");
        assert!(p.rules.regex.is_some());
        assert_eq!(p.unmapped.len(), 1, "a second pattern is reported");
        let p = parsed("required|string|starts_with:x|ip");
        let rules: Vec<&str> = p.unmapped.iter().map(|u| u.rule.as_str()).collect();
        assert_eq!(rules, ["starts_with:x", "ip"]);
        let p = parsed("boolean|max:1");
        assert_eq!(p.rules.max, None);
        assert_eq!(p.unmapped.len(), 1);
    }

    #[test]
    fn lists_as_pelican_writes_them() {
        let p = parse_list(&["required".into(), "string".into(), r"regex:/^(a|b)$/".into()]);
        assert!(p.unmapped.is_empty());
        assert!(p.rules.required && p.rules.check("a").is_ok() && p.rules.check("c").is_err());
    }
}
