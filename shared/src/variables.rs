//! Validation rules for blueprint variables.
//!
//! Rules are structured data rather than Laravel-style strings; [`crate::rules`] translates
//! the strings eggs carry (`required|string|max:20`) into these.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VariableType {
    #[default]
    String,
    Integer,
    /// Any decimal number (Laravel's `numeric`); min and max bound its value.
    Number,
    Boolean,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariableRules {
    #[serde(rename = "type", default)]
    pub kind: VariableType,
    /// An empty value is refused.
    #[serde(default)]
    pub required: bool,
    /// For integers the smallest value; for strings the shortest length in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// For integers the largest value; for strings the longest length in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// The value must be one of these.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    /// The whole value must match this regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Values longer than this are refused whatever the rules say.
pub const MAX_VALUE_CHARS: usize = 4096;

impl VariableRules {
    /// Checks the rules themselves (a regex that compiles, min not above max).
    pub fn check_definition(&self) -> Result<(), String> {
        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            return Err(format!("min {min} is above max {max}"));
        }
        if let Some(re) = &self.regex {
            compile(re).map_err(|e| format!("invalid regex: {e}"))?;
        }
        if self.kind == VariableType::Boolean && (self.min.is_some() || self.max.is_some()) {
            return Err("a boolean has no min or max".into());
        }
        Ok(())
    }

    /// Checks one value. An empty value passes unless the variable is required.
    pub fn check(&self, value: &str) -> Result<(), String> {
        if value.chars().count() > MAX_VALUE_CHARS {
            return Err(format!("must be at most {MAX_VALUE_CHARS} characters"));
        }
        if value.contains('\0') {
            return Err("must not contain NUL".into());
        }
        if value.is_empty() {
            return if self.required {
                Err("is required".into())
            } else {
                Ok(())
            };
        }
        match self.kind {
            VariableType::String => {
                let len = i64::try_from(value.chars().count()).unwrap_or(i64::MAX);
                if let Some(min) = self.min.filter(|&m| len < m) {
                    return Err(format!("must be at least {min} characters"));
                }
                if let Some(max) = self.max.filter(|&m| len > m) {
                    return Err(format!("must be at most {max} characters"));
                }
            }
            VariableType::Integer => {
                let n: i64 = value.parse().map_err(|_| "must be a whole number".to_string())?;
                if let Some(min) = self.min.filter(|&m| n < m) {
                    return Err(format!("must be at least {min}"));
                }
                if let Some(max) = self.max.filter(|&m| n > m) {
                    return Err(format!("must be at most {max}"));
                }
            }
            VariableType::Number => {
                let n: f64 = value
                    .parse()
                    .ok()
                    .filter(|n: &f64| n.is_finite())
                    .ok_or_else(|| "must be a number".to_string())?;
                #[allow(clippy::cast_precision_loss)]
                if let Some(min) = self.min.filter(|&m| n < m as f64) {
                    return Err(format!("must be at least {min}"));
                }
                #[allow(clippy::cast_precision_loss)]
                if let Some(max) = self.max.filter(|&m| n > m as f64) {
                    return Err(format!("must be at most {max}"));
                }
            }
            VariableType::Boolean => {
                if !matches!(value, "true" | "false" | "1" | "0") {
                    return Err("must be true or false".into());
                }
            }
        }
        if let Some(list) = &self.one_of
            && !list.iter().any(|v| v == value)
        {
            return Err(format!("must be one of: {}", list.join(", ")));
        }
        if let Some(re) = &self.regex {
            let re = compile(re).map_err(|e| format!("rule regex is invalid: {e}"))?;
            if !re.is_match(value) {
                return Err(format!("must match {}", re.as_str()));
            }
        }
        Ok(())
    }
}

fn compile(re: &str) -> Result<regex::Regex, regex::Error> {
    // Anchored so that the whole value must match, as users expect from a field rule.
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(kind: VariableType) -> VariableRules {
        VariableRules {
            kind,
            ..Default::default()
        }
    }

    #[test]
    fn integers() {
        let r = VariableRules {
            min: Some(1),
            max: Some(10),
            required: true,
            ..rules(VariableType::Integer)
        };
        assert!(r.check("5").is_ok());
        assert_eq!(r.check("0").unwrap_err(), "must be at least 1");
        assert_eq!(r.check("11").unwrap_err(), "must be at most 10");
        assert_eq!(r.check("five").unwrap_err(), "must be a whole number");
        assert_eq!(r.check("").unwrap_err(), "is required");
    }

    #[test]
    fn strings_lists_and_regexes() {
        let r = VariableRules {
            max: Some(5),
            one_of: Some(vec!["easy".into(), "hard".into(), "toolongvalue".into()]),
            ..rules(VariableType::String)
        };
        assert!(r.check("easy").is_ok());
        assert!(r.check("").is_ok());
        assert!(r.check("medium").unwrap_err().contains("at most 5"));
        assert!(r.check("hardx").unwrap_err().contains("one of"));
        let r = VariableRules {
            regex: Some("[a-z]+".into()),
            ..rules(VariableType::String)
        };
        assert!(r.check("abc").is_ok());
        assert!(r.check("abc1").is_err(), "the whole value must match");
        let bad = VariableRules {
            regex: Some("(".into()),
            ..rules(VariableType::String)
        };
        assert!(bad.check_definition().is_err());
    }

    #[test]
    fn booleans() {
        let r = rules(VariableType::Boolean);
        assert!(r.check("true").is_ok());
        assert!(r.check("0").is_ok());
        assert!(r.check("yes").is_err());
    }
}
