//! Balancer parameters, declared once per policy.
//!
//! A policy lists its parameters in a table of [`ParamSpec`]s: the name
//! (the directive is `<balancer>_<name>`), the type and range, and the
//! default. The glue looks a directive up in that table by name, parses its
//! value with [`Params::set`] and hands the policy a [`Params`]; the policy
//! reads `params.int("batch_size")` and gets the configured value or the
//! table's default. Nothing else holds a default.
//!
//! ```
//! use pdgate_core::balance::params::{ParamSpec, Params};
//! static SPECS: [ParamSpec; 1] = [ParamSpec::int("batch_size", 16)];
//! let mut p = Params::new(&SPECS);
//! assert_eq!(p.int("batch_size"), 16);
//! p.set("batch_size", b"8").unwrap();
//! assert_eq!(p.int("batch_size"), 8);
//! ```

use std::fmt;

/// Most parameters one policy may declare.
pub const MAX_PARAMS: usize = 4;

/// The type and range of a parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A whole number in `min..=max`.
    Int { min: u64, max: u64 },
    /// A finite real number in `min..=max`.
    Float { min: f64, max: f64 },
}

/// A parameter's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

/// One parameter of a policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamSpec {
    /// The directive's suffix: `<balancer>_<name>`.
    pub name: &'static str,
    pub kind: Kind,
    /// The value when the directive is absent.
    pub default: Value,
}

impl ParamSpec {
    /// A positive whole number (1 or more).
    pub const fn int(name: &'static str, default: u64) -> Self {
        ParamSpec { name, kind: Kind::Int { min: 1, max: u64::MAX }, default: Value::Int(default) }
    }

    /// A non-negative real number.
    pub const fn float(name: &'static str, default: f64) -> Self {
        ParamSpec {
            name,
            kind: Kind::Float { min: 0.0, max: f64::INFINITY },
            default: Value::Float(default),
        }
    }

    /// The same parameter limited to `min..=max` (whole numbers).
    pub const fn int_range(name: &'static str, default: u64, min: u64, max: u64) -> Self {
        ParamSpec { name, kind: Kind::Int { min, max }, default: Value::Int(default) }
    }

    /// What a value must be, for error messages ("a positive number").
    pub fn expects(&self) -> String {
        match self.kind {
            Kind::Int { min: 1, max: u64::MAX } => "a positive number".into(),
            Kind::Int { min: 0, max: u64::MAX } => "a non-negative number".into(),
            Kind::Int { min, max: u64::MAX } => format!("a number of at least {min}"),
            Kind::Int { min, max } => format!("a number from {min} to {max}"),
            Kind::Float { min, max } if min == 0.0 && max == f64::INFINITY => {
                "a non-negative number".into()
            }
            Kind::Float { min, max } if max == f64::INFINITY => {
                format!("a number of at least {min}")
            }
            Kind::Float { min, max } => format!("a number from {min} to {max}"),
        }
    }

    /// Parses a directive's value: a decimal number in range.
    pub fn parse(&self, raw: &[u8]) -> Result<Value, ParamError> {
        let text = std::str::from_utf8(raw).ok();
        let ok = match self.kind {
            Kind::Int { min, max } => text
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|n| (min..=max).contains(n))
                .map(Value::Int),
            Kind::Float { min, max } => text
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|x| x.is_finite() && *x >= min && *x <= max)
                .map(Value::Float),
        };
        ok.ok_or_else(|| ParamError::Invalid {
            value: String::from_utf8_lossy(raw).into_owned(),
            expects: self.expects(),
        })
    }
}

/// Why a parameter directive was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    /// The policy declares no parameter of that name.
    Unknown(String),
    /// Given twice in one `upstream {}`.
    Duplicate,
    /// Not a number of the parameter's type, or out of its range.
    Invalid { value: String, expects: String },
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamError::Unknown(name) => write!(f, "unknown parameter \"{name}\""),
            ParamError::Duplicate => f.write_str("is duplicate"),
            ParamError::Invalid { value, expects } => {
                write!(f, "invalid value \"{value}\", it must be {expects}")
            }
        }
    }
}

/// The role word of a balancer that has one (pd_score_balance's
/// `prefill|decode|off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// No role (the balancer's on/off directive).
    #[default]
    Any,
    /// The upstream runs prefills: their lengths are shared with decode
    /// upstreams while they run.
    Prefill,
    /// The upstream places decodes, looking ahead over those prefills.
    Decode,
}

/// An upstream's parameter values: what its directives set, over the
/// policy's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    specs: &'static [ParamSpec],
    set: [Option<Value>; MAX_PARAMS],
    /// The role word, for a balancer that has one.
    pub role: Role,
}

impl Params {
    /// No parameter set yet: every one at its default.
    pub const fn new(specs: &'static [ParamSpec]) -> Self {
        Params { specs, set: [None; MAX_PARAMS], role: Role::Any }
    }

    /// The policy's table.
    pub fn specs(&self) -> &'static [ParamSpec] {
        self.specs
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.specs.iter().take(MAX_PARAMS).position(|s| s.name == name)
    }

    /// Sets parameter `name` from a directive's value, once.
    pub fn set(&mut self, name: &str, raw: &[u8]) -> Result<(), ParamError> {
        let i = self.index(name).ok_or_else(|| ParamError::Unknown(name.to_string()))?;
        if self.set[i].is_some() {
            return Err(ParamError::Duplicate);
        }
        self.set[i] = Some(self.specs[i].parse(raw)?);
        Ok(())
    }

    /// Whether a directive set `name`.
    pub fn is_set(&self, name: &str) -> bool {
        self.index(name).is_some_and(|i| self.set[i].is_some())
    }

    fn value(&self, name: &str) -> Option<Value> {
        let i = self.index(name)?;
        Some(self.set[i].unwrap_or(self.specs[i].default))
    }

    /// A whole-number parameter: its value, or its default; 0 for a name
    /// the policy does not declare as a whole number (a bug the policy's
    /// table test catches).
    pub fn int(&self, name: &str) -> u64 {
        match self.value(name) {
            Some(Value::Int(n)) => n,
            _ => 0,
        }
    }

    /// A real-number parameter: its value, or its default; 0.0 for a name
    /// the policy does not declare as a real number.
    pub fn float(&self, name: &str) -> f64 {
        match self.value(name) {
            Some(Value::Float(x)) => x,
            _ => 0.0,
        }
    }
}

/// Checks a policy's table: distinct names, at most [`MAX_PARAMS`],
/// defaults of the declared type and in range. For unit tests.
pub fn check_specs(specs: &[ParamSpec]) -> Result<(), String> {
    if specs.len() > MAX_PARAMS {
        return Err(format!("{} parameters, at most {MAX_PARAMS}", specs.len()));
    }
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|t| t.name == s.name) {
            return Err(format!("\"{}\" twice", s.name));
        }
        let ok = match (s.kind, s.default) {
            (Kind::Int { min, max }, Value::Int(d)) => (min..=max).contains(&d),
            (Kind::Float { min, max }, Value::Float(d)) => d >= min && d <= max,
            _ => false,
        };
        if !ok {
            return Err(format!("\"{}\": default out of type or range", s.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    static SPECS: [ParamSpec; 3] = [
        ParamSpec::int("batch_size", 16),
        ParamSpec::float("a", 0.5),
        ParamSpec::int_range("level", 3, 1, 9),
    ];

    #[test]
    fn defaults_until_set() {
        let mut p = Params::new(&SPECS);
        assert_eq!((p.int("batch_size"), p.float("a"), p.int("level")), (16, 0.5, 3));
        assert!(!p.is_set("a"));
        p.set("a", b"2.25").unwrap();
        p.set("batch_size", b"1").unwrap();
        assert_eq!((p.int("batch_size"), p.float("a")), (1, 2.25));
        assert!(p.is_set("a"));
        // Wrong type or name reads as zero.
        assert_eq!((p.int("a"), p.float("batch_size"), p.int("nope")), (0, 0.0, 0));
    }

    #[test]
    fn range_and_type_errors_say_what_is_expected() {
        let mut p = Params::new(&SPECS);
        let cases: &[(&str, &[u8], &str)] = &[
            ("batch_size", b"0", "invalid value \"0\", it must be a positive number"),
            ("batch_size", b"many", "invalid value \"many\", it must be a positive number"),
            ("batch_size", b"-1", "invalid value \"-1\", it must be a positive number"),
            ("batch_size", b"1.5", "invalid value \"1.5\", it must be a positive number"),
            ("a", b"-3", "invalid value \"-3\", it must be a non-negative number"),
            ("a", b"inf", "invalid value \"inf\", it must be a non-negative number"),
            ("a", b"NaN", "invalid value \"NaN\", it must be a non-negative number"),
            ("level", b"10", "invalid value \"10\", it must be a number from 1 to 9"),
            ("size", b"1", "unknown parameter \"size\""),
        ];
        for (name, raw, want) in cases {
            let got = p.set(name, raw).map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_string()), "{name} {:?}", String::from_utf8_lossy(raw));
        }
        // Nothing refused was kept.
        assert_eq!(p.int("batch_size"), 16);
    }

    #[test]
    fn each_parameter_once() {
        let mut p = Params::new(&SPECS);
        p.set("level", b"9").unwrap();
        assert_eq!(p.set("level", b"2"), Err(ParamError::Duplicate));
        assert_eq!(p.int("level"), 9);
    }

    #[test]
    fn tables_are_checked() {
        assert_eq!(check_specs(&SPECS), Ok(()));
        let twice = [ParamSpec::int("x", 1), ParamSpec::int("x", 2)];
        assert!(check_specs(&twice).is_err());
        let out = [ParamSpec::int_range("x", 0, 1, 2)];
        assert!(check_specs(&out).is_err());
        let mixed = [ParamSpec { default: Value::Float(1.0), ..ParamSpec::int("x", 1) }];
        assert!(check_specs(&mixed).is_err());
    }
}
