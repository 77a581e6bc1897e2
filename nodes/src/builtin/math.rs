//! `ComfyMathExpression` (utils/math): a formula over the node's values `a`..`z`, with
//! Python's arithmetic (ComfyUI evaluates it as a Python expression): `int` and `float`
//! kept apart, `/` always a float, `//` and `%` flooring, `**` powers, comparisons, and the
//! functions ComfyUI allows (`sum min max abs round pow sqrt ceil floor log log2 log10 sin
//! cos tan int float`); `values` is the list of every value given. The result comes out as
//! FLOAT, as INT (truncated) and as BOOL (not zero); a result that is not a finite number is
//! an error. `ComfyNumberConvert` turns an INT, FLOAT, BOOLEAN or numeric STRING into FLOAT
//! and INT.

use std::sync::LazyLock;

use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::value::Value;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(MathExpression);
    registry.register(NumberConvert);
}

/// The value sockets, `values.a` to `values.z` (ComfyUI's growing input group).
const VALUE_INPUTS: [&str; 26] = [
    "values.a", "values.b", "values.c", "values.d", "values.e", "values.f", "values.g", "values.h",
    "values.i", "values.j", "values.k", "values.l", "values.m", "values.n", "values.o", "values.p",
    "values.q", "values.r", "values.s", "values.t", "values.u", "values.v", "values.w", "values.x",
    "values.y", "values.z",
];

static MATH_EXPRESSION: LazyLock<NodeSchema> = LazyLock::new(|| {
    let mut schema = NodeSchema::new("ComfyMathExpression", "Math Expression", "utils/math")
        .input(InputSpec::string("expression", "a + b", true));
    for name in VALUE_INPUTS {
        schema = schema.input(InputSpec::link(name, PortType::Any).optional());
    }
    schema
        .named_output("FLOAT", PortType::Float)
        .named_output("INT", PortType::Int)
        .named_output("BOOL", PortType::Boolean)
});

struct MathExpression;

impl Node for MathExpression {
    fn schema(&self) -> &NodeSchema {
        &MATH_EXPRESSION
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let expression = inputs.str("expression")?;
        if expression.trim().is_empty() {
            return Err(NodeError::InvalidInput("the expression is empty".into()));
        }
        let mut names = Vec::new();
        for name in VALUE_INPUTS {
            let Some(value) = inputs.get(name) else {
                continue;
            };
            let number = match value {
                Value::Int(v) => Num::Int(*v),
                Value::Float(v) => Num::Float(*v),
                Value::Boolean(v) => Num::Int(i64::from(*v)),
                other => {
                    return Err(NodeError::InvalidInput(format!(
                        "{name} is {}; values are INT, FLOAT or BOOLEAN",
                        other.type_name()
                    )));
                }
            };
            names.push((&name["values.".len()..], number));
        }
        let result = evaluate(expression, &names)
            .map_err(|e| NodeError::InvalidInput(format!("expression {expression:?}: {e}")))?;
        let float = result.as_f64();
        if !float.is_finite() {
            return Err(NodeError::InvalidInput(format!(
                "expression {expression:?} is {float}, not a finite number"
            )));
        }
        let int = match result {
            Num::Int(v) => v,
            Num::Float(v) if v.abs() < 9.2e18 => v.trunc() as i64,
            Num::Float(v) => {
                return Err(NodeError::InvalidInput(format!(
                    "expression {expression:?} is {v}, too large for an INT"
                )));
            }
        };
        Ok(vec![
            Value::Float(float),
            Value::Int(int),
            Value::Boolean(float != 0.0),
        ])
    }
}

static NUMBER_CONVERT: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ComfyNumberConvert", "Number Convert", "utils")
        .input(InputSpec::link("value", PortType::Any))
        .named_output("FLOAT", PortType::Float)
        .named_output("INT", PortType::Int)
});

struct NumberConvert;

impl Node for NumberConvert {
    fn schema(&self) -> &NodeSchema {
        &NUMBER_CONVERT
    }

    /// Python's `float()` and `int()` of the value; a string is read as an integer, else
    /// as a float (surrounding spaces ignored). The INT of a float is truncated.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let number = match inputs.required("value")? {
            Value::Int(v) => Num::Int(*v),
            Value::Float(v) => Num::Float(*v),
            Value::Boolean(v) => Num::Int(i64::from(*v)),
            Value::String(text) => {
                let trimmed = text.trim();
                trimmed
                    .parse::<i64>()
                    .map(Num::Int)
                    .or_else(|_| trimmed.parse::<f64>().map(Num::Float))
                    .map_err(|_| NodeError::InvalidInput(format!("{text:?} is not a number")))?
            }
            other => {
                return Err(NodeError::InvalidInput(format!(
                    "value is {}; ComfyNumberConvert takes INT, FLOAT, BOOLEAN or STRING",
                    other.type_name()
                )));
            }
        };
        let float = number.as_f64();
        let int = match number {
            Num::Int(v) => v,
            Num::Float(v) if v.is_finite() && v.abs() < 9.2e18 => v.trunc() as i64,
            Num::Float(v) => {
                return Err(NodeError::InvalidInput(format!("{v} cannot be an INT")));
            }
        };
        Ok(vec![Value::Float(float), Value::Int(int)])
    }
}

/// A Python number: `int` or `float` (a `bool` is an `int`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(v) => v as f64,
            Num::Float(v) => v,
        }
    }
}

/// A value while evaluating: a number, or the `values` list (only functions take it).
#[derive(Debug, Clone, PartialEq)]
enum Item {
    Num(Num),
    List(Vec<Num>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Num(Num),
    Name(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

const OPERATORS: [&str; 14] = [
    "**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "<", ">", "^",
];

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || chars[i] == '_'
                    || ((chars[i] == '+' || chars[i] == '-') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
            let literal: String = chars[start..i].iter().filter(|&&c| c != '_').collect();
            let number = if literal.contains(['.', 'e', 'E']) {
                Num::Float(
                    literal
                        .parse()
                        .map_err(|_| format!("bad number {literal:?}"))?,
                )
            } else {
                Num::Int(
                    literal
                        .parse()
                        .map_err(|_| format!("bad number {literal:?}"))?,
                )
            };
            tokens.push(Token::Num(number));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(Token::Name(chars[start..i].iter().collect()));
        } else if c == '(' || c == ')' || c == ',' {
            tokens.push(match c {
                '(' => Token::Open,
                ')' => Token::Close,
                _ => Token::Comma,
            });
            i += 1;
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let op = OPERATORS
                .iter()
                .find(|op| rest.starts_with(*op))
                .ok_or_else(|| format!("unexpected {c:?}"))?;
            if *op == "^" {
                return Err("^ is bitwise xor in Python; write ** for a power".into());
            }
            tokens.push(Token::Op(op));
            i += op.len();
        }
    }
    Ok(tokens)
}

/// Evaluates `text` with `names` bound; `values` is every bound value in order.
fn evaluate(text: &str, names: &[(&str, Num)]) -> Result<Num, String> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        at: 0,
        names,
    };
    let item = parser.expression(0)?;
    if parser.at != parser.tokens.len() {
        return Err(format!("unexpected {:?}", parser.tokens[parser.at]));
    }
    match item {
        Item::Num(n) => Ok(n),
        Item::List(_) => Err("the result is a list, not a number".into()),
    }
}

struct Parser<'a> {
    tokens: Vec<Token>,
    at: usize,
    names: &'a [(&'a str, Num)],
}

/// Binding power of a binary operator (Python's precedence, lowest first).
fn precedence(op: &str) -> u8 {
    match op {
        "==" | "!=" | "<" | "<=" | ">" | ">=" => 1,
        "+" | "-" => 2,
        "*" | "/" | "//" | "%" => 3,
        _ => 5, // "**", above unary minus
    }
}

impl Parser<'_> {
    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn expression(&mut self, min: u8) -> Result<Item, String> {
        let mut left = self.unary()?;
        while let Some(Token::Op(op)) = self.tokens.get(self.at).cloned() {
            let power = precedence(op);
            if power < min || power == 0 {
                break;
            }
            self.at += 1;
            // `**` is right-associative; the others left.
            let right = self.expression(if op == "**" { power } else { power + 1 })?;
            left = Item::Num(binary(op, number(left)?, number(right)?)?);
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Item, String> {
        match self.tokens.get(self.at) {
            Some(Token::Op("-")) => {
                self.at += 1;
                // -a ** b is -(a ** b) in Python.
                let operand = number(self.expression(4)?)?;
                Ok(Item::Num(match operand {
                    Num::Int(v) => Num::Int(v.checked_neg().ok_or("integer overflow")?),
                    Num::Float(v) => Num::Float(-v),
                }))
            }
            Some(Token::Op("+")) => {
                self.at += 1;
                self.expression(4)
            }
            _ => self.atom(),
        }
    }

    fn atom(&mut self) -> Result<Item, String> {
        match self.next() {
            Some(Token::Num(n)) => Ok(Item::Num(n)),
            Some(Token::Open) => {
                let inner = self.expression(0)?;
                match self.next() {
                    Some(Token::Close) => Ok(inner),
                    _ => Err("missing )".into()),
                }
            }
            Some(Token::Name(name)) => {
                if self.tokens.get(self.at) == Some(&Token::Open) {
                    self.at += 1;
                    let args = self.arguments()?;
                    return call(&name, &args).map(Item::Num);
                }
                if name == "values" {
                    return Ok(Item::List(self.names.iter().map(|(_, v)| *v).collect()));
                }
                self.names
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| Item::Num(*v))
                    .ok_or_else(|| format!("{name:?} is not defined (connect values.{name})"))
            }
            Some(other) => Err(format!("unexpected {other:?}")),
            None => Err("the expression ends too early".into()),
        }
    }

    fn arguments(&mut self) -> Result<Vec<Item>, String> {
        let mut args = Vec::new();
        if self.tokens.get(self.at) == Some(&Token::Close) {
            self.at += 1;
            return Ok(args);
        }
        loop {
            args.push(self.expression(0)?);
            match self.next() {
                Some(Token::Comma) => continue,
                Some(Token::Close) => return Ok(args),
                _ => return Err("missing ) after arguments".into()),
            }
        }
    }
}

fn number(item: Item) -> Result<Num, String> {
    match item {
        Item::Num(n) => Ok(n),
        Item::List(_) => Err("a list is not a number (use sum(values), min(values)...)".into()),
    }
}

fn binary(op: &str, a: Num, b: Num) -> Result<Num, String> {
    use Num::{Float, Int};
    let compare = |r: bool| Ok(Int(i64::from(r)));
    let (x, y) = (a.as_f64(), b.as_f64());
    match (op, a, b) {
        ("==", ..) => compare(x == y),
        ("!=", ..) => compare(x != y),
        ("<", ..) => compare(x < y),
        ("<=", ..) => compare(x <= y),
        (">", ..) => compare(x > y),
        (">=", ..) => compare(x >= y),
        ("/", ..) if y == 0.0 => Err("division by zero".into()),
        ("//" | "%", Int(_), Int(0)) => Err("integer division or modulo by zero".into()),
        ("//" | "%", ..) if y == 0.0 => Err("float division or modulo by zero".into()),
        ("/", ..) => Ok(Float(x / y)),
        ("+", Int(p), Int(q)) => p.checked_add(q).map(Int).ok_or_else(overflow),
        ("-", Int(p), Int(q)) => p.checked_sub(q).map(Int).ok_or_else(overflow),
        ("*", Int(p), Int(q)) => p.checked_mul(q).map(Int).ok_or_else(overflow),
        ("//", Int(p), Int(q)) => Ok(Int(
            p.div_euclid(q) - i64::from(q < 0 && p.rem_euclid(q) != 0)
        )),
        ("%", Int(p), Int(q)) => {
            Ok(Int(p - q
                * (p.div_euclid(q)
                    - i64::from(q < 0 && p.rem_euclid(q) != 0))))
        }
        ("**", Int(p), Int(q)) if q >= 0 => u32::try_from(q)
            .ok()
            .and_then(|q| p.checked_pow(q))
            .map(Int)
            .ok_or_else(overflow),
        ("+", ..) => Ok(Float(x + y)),
        ("-", ..) => Ok(Float(x - y)),
        ("*", ..) => Ok(Float(x * y)),
        ("//", ..) => Ok(Float((x / y).floor())),
        ("%", ..) => Ok(Float(x - y * (x / y).floor())),
        ("**", ..) if x == 0.0 && y < 0.0 => Err("0 cannot be raised to a negative power".into()),
        ("**", ..) => Ok(Float(x.powf(y))),
        _ => Err(format!("unknown operator {op}")),
    }
}

fn overflow() -> String {
    "integer overflow".into()
}

/// The numbers of `args`, a lone list spread (`min(values)` as `min(a, b, ...)`).
fn spread(args: &[Item]) -> Result<Vec<Num>, String> {
    match args {
        [Item::List(list)] => Ok(list.clone()),
        _ => args.iter().cloned().map(number).collect(),
    }
}

fn call(name: &str, args: &[Item]) -> Result<Num, String> {
    use Num::{Float, Int};
    let nums = spread(args)?;
    let one = || -> Result<f64, String> {
        match nums.as_slice() {
            [n] => Ok(n.as_f64()),
            _ => Err(format!("{name}() takes one number, got {}", nums.len())),
        }
    };
    let to_int = |v: f64| -> Result<Num, String> {
        if v.is_finite() && v.abs() < 9.2e18 {
            Ok(Int(v as i64))
        } else {
            Err(format!("{name}() of {v} is not an integer"))
        }
    };
    match name {
        "sum" => nums.iter().try_fold(Int(0), |acc, &n| binary("+", acc, n)),
        "min" | "max" => {
            let mut best = *nums.first().ok_or_else(|| format!("{name}() of nothing"))?;
            for &n in &nums[1..] {
                let better = if name == "min" {
                    n.as_f64() < best.as_f64()
                } else {
                    n.as_f64() > best.as_f64()
                };
                if better {
                    best = n;
                }
            }
            Ok(best)
        }
        "abs" => match nums.as_slice() {
            [Int(v)] => v.checked_abs().map(Int).ok_or_else(overflow),
            _ => one().map(|v| Float(v.abs())),
        },
        "round" => match nums.as_slice() {
            [Int(v)] => Ok(Int(*v)),
            [n] => to_int(n.as_f64().round_ties_even()),
            [n, Int(digits)] => {
                let scale = 10f64.powi(i32::try_from(*digits).map_err(|_| overflow())?);
                Ok(Float((n.as_f64() * scale).round_ties_even() / scale))
            }
            _ => Err("round() takes a number and optional digits".into()),
        },
        "pow" => match nums.as_slice() {
            [a, b] => binary("**", *a, *b),
            _ => Err("pow() takes two numbers".into()),
        },
        "sqrt" if one()? < 0.0 => Err("sqrt() of a negative number".into()),
        "sqrt" => Ok(Float(one()?.sqrt())),
        "ceil" => to_int(one()?.ceil()),
        "floor" => to_int(one()?.floor()),
        "int" => match nums.as_slice() {
            [Int(v)] => Ok(Int(*v)),
            _ => to_int(one()?.trunc()),
        },
        "float" => Ok(Float(one()?)),
        "log" | "log2" | "log10" => {
            let (x, base) = match (name, nums.as_slice()) {
                ("log", [x, b]) => (x.as_f64(), b.as_f64()),
                ("log", _) => (one()?, std::f64::consts::E),
                ("log2", _) => (one()?, 2.0),
                _ => (one()?, 10.0),
            };
            if x <= 0.0 || base <= 0.0 || base == 1.0 {
                return Err(format!("{name}() is undefined there"));
            }
            Ok(Float(match name {
                "log2" => x.log2(),
                "log10" => x.log10(),
                _ => x.ln() / base.ln(),
            }))
        }
        "sin" => Ok(Float(one()?.sin())),
        "cos" => Ok(Float(one()?.cos())),
        "tan" => Ok(Float(one()?.tan())),
        other => Err(format!("{other}() is not an allowed function")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str) -> Result<Num, String> {
        evaluate(
            text,
            &[
                ("a", Num::Int(7)),
                ("b", Num::Float(-2.5)),
                ("c", Num::Int(1)),
            ],
        )
    }

    #[test]
    fn python_arithmetic() {
        use Num::{Float, Int};
        let cases = [
            ("a + c", Int(8)),
            ("a / 2", Float(3.5)),
            ("a // 2", Int(3)),
            ("-a // 2", Int(-4)),
            ("a % -3", Int(-2)),
            ("-7 % 3", Int(2)),
            ("b // 1", Float(-3.0)),
            ("2 ** 3 ** 2", Int(512)),
            ("-2 ** 2", Int(-4)),
            ("2 ** -1", Float(0.5)),
            ("min(abs(b), 16) * a", Float(17.5)),
            ("sum(values)", Float(5.5)),
            ("max(values)", Int(7)),
            ("round(2.5) + round(3.5)", Int(6)),
            ("round(b)", Int(-2)),
            ("int(b)", Int(-2)),
            ("floor(b)", Int(-3)),
            ("ceil(b)", Int(-2)),
            ("a > c", Int(1)),
            ("(a + 1) * 2 == 16", Int(1)),
            ("log(8, 2)", Float(3.0)),
            ("sqrt(16)", Float(4.0)),
            ("1e3 + .5", Float(1000.5)),
            ("a * 24 % 17", Int(15)),
        ];
        for (text, want) in cases {
            assert_eq!(eval(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (text, needle) in [
            ("a / 0", "division by zero"),
            ("a // 0", "by zero"),
            ("d + 1", "\"d\" is not defined"),
            ("a +", "ends too early"),
            ("(a + 1", "missing )"),
            ("a ^ 2", "write **"),
            ("exec(1)", "not an allowed function"),
            ("values", "a list"),
            ("sqrt(-1)", "negative"),
            ("9223372036854775807 + 1", "overflow"),
        ] {
            let error = eval(text).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn the_node_gives_float_and_truncated_int() {
        let rig = crate::testing::Rig::new(|_| {});
        let out = rig
            .run(
                &MathExpression,
                &[
                    ("expression", Value::String("a / b".into())),
                    ("values.a", Value::Int(-7)),
                    ("values.b", Value::Boolean(true)),
                ],
            )
            .unwrap();
        assert!(matches!(out[0], Value::Float(v) if v == -7.0));
        assert!(matches!(out[1], Value::Int(-7)));
        assert!(matches!(out[2], Value::Boolean(true)));
        let out = rig
            .run(
                &MathExpression,
                &[
                    ("expression", Value::String("min(abs(b), 16) * a".into())),
                    ("values.a", Value::Float(2.0)),
                    ("values.b", Value::Float(-2.75)),
                ],
            )
            .unwrap();
        assert!(matches!(out[0], Value::Float(v) if v == 5.5));
        assert!(matches!(out[1], Value::Int(5)));
        let error = rig
            .run(
                &MathExpression,
                &[("expression", Value::String("  ".into()))],
            )
            .unwrap_err()
            .to_string();
        assert!(error.contains("empty"), "{error}");
        let error = rig
            .run(
                &MathExpression,
                &[
                    ("expression", Value::String("a".into())),
                    ("values.a", Value::String("x".into())),
                ],
            )
            .unwrap_err()
            .to_string();
        assert!(error.contains("values.a is STRING"), "{error}");
    }

    #[test]
    fn number_convert_reads_numbers_of_every_kind() {
        let rig = crate::testing::Rig::new(|_| {});
        let convert = |value: Value| rig.run(&NumberConvert, &[("value", value)]);
        let pair = |out: Vec<Value>| match (&out[0], &out[1]) {
            (Value::Float(f), Value::Int(i)) => (*f, *i),
            _ => panic!("FLOAT and INT"),
        };
        assert_eq!(
            pair(convert(Value::String(" 1 ".into())).unwrap()),
            (1.0, 1)
        );
        assert_eq!(
            pair(convert(Value::String("-2.75".into())).unwrap()),
            (-2.75, -2)
        );
        assert_eq!(pair(convert(Value::Float(1.5)).unwrap()), (1.5, 1));
        assert_eq!(pair(convert(Value::Boolean(true)).unwrap()), (1.0, 1));
        assert_eq!(pair(convert(Value::Int(-3)).unwrap()), (-3.0, -3));
        let error = convert(Value::String("one".into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"one\" is not a number"), "{error}");
        let error = convert(Value::String("inf".into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot be an INT"), "{error}");
    }
}
