//! `snapshot`'s socket filter: the subset of ss's expression language that selects sockets by
//! address and port (`sport = :8080`, `dst 10.0.0.0/8`, `not (src [::1] or dport > :1024)`),
//! tokenized and parsed by recursive descent into an [`Expr`] tree, then evaluated per socket.
//! States are not part of the language (they are `--state`/`-l`, asked of the kernel).
//!
//! Grammar (precedence `not` > `and` > `or`; two terms side by side mean `and`, as in ss):
//!
//! ```text
//! expr    := and ( ("or" | "||" | "|") and )*
//! and     := unary ( ["and" | "&&" | "&"] unary )*
//! unary   := ("not" | "!") unary | "(" expr ")" | cond
//! cond    := ("sport" | "dport") [portop] port
//!          | ("src" | "dst") ["=" | "==" | "eq" | "!=" | "neq" | "ne"] host
//! portop  := "=" | "==" | "eq" | "!=" | "neq" | "ne" | "<" | "lt" | ">" | "gt" | "<=" | "le" | ">=" | "ge"
//! port    := ":N" | "N" | "*:N"
//! host    := ADDR[/PREFIX][:PORT] | [V6ADDR][/PREFIX][:PORT] | V6ADDR[/PREFIX] | :PORT | * | *:PORT
//! ```

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// A parse error, one line, naming the offending token and its position (1-based, in the
/// arguments joined by spaces).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad filter at {pos}: {message}")]
pub struct FilterError {
    pub pos: usize,
    pub message: String,
}

/// Which end of the connection a condition looks at: `s*` is the local end, `d*` the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// An address with a prefix length (a single host when the prefix is the full width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// `src`/`dst` operand: an optional network and an optional port; both absent means "any".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCond {
    pub net: Option<Net>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Port { side: Side, op: PortOp, port: u16 },
    Host { side: Side, cond: HostCond },
}

impl Expr {
    /// Whether a socket with these ends matches. A listener's peer is the all-zero address and
    /// port 0, as the kernel reports it (so `dport = :0` selects listeners, as in ss).
    pub fn matches(&self, local: SocketAddr, peer: SocketAddr) -> bool {
        match self {
            Expr::Or(a, b) => a.matches(local, peer) || b.matches(local, peer),
            Expr::And(a, b) => a.matches(local, peer) && b.matches(local, peer),
            Expr::Not(e) => !e.matches(local, peer),
            Expr::Port { side, op, port } => {
                let p = pick(*side, local, peer).port();
                match op {
                    PortOp::Eq => p == *port,
                    PortOp::Ne => p != *port,
                    PortOp::Lt => p < *port,
                    PortOp::Gt => p > *port,
                    PortOp::Le => p <= *port,
                    PortOp::Ge => p >= *port,
                }
            }
            Expr::Host { side, cond } => {
                let a = pick(*side, local, peer);
                cond.port.is_none_or(|p| p == a.port()) && cond.net.is_none_or(|n| n.contains(a.ip()))
            }
        }
    }
}

fn pick(side: Side, local: SocketAddr, peer: SocketAddr) -> SocketAddr {
    match side {
        Side::Src => local,
        Side::Dst => peer,
    }
}

impl Net {
    /// Prefix match; an IPv4 network also matches IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`,
    /// what a dual-stack socket shows for an IPv4 peer).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Parses the trailing arguments of `snapshot` (joined by spaces). No arguments: no filter.
pub fn parse(args: &[String]) -> Result<Option<Expr>, FilterError> {
    let text = args.join(" ");
    let tokens = tokenize(&text)?;
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut p = Parser { tokens, at: 0, end: text.chars().count() + 1 };
    let e = p.expr()?;
    if let Some(t) = p.peek() {
        let msg = if t.kind == Tok::RParen { "unbalanced \")\"".to_owned() } else { format!("unexpected {}", t.describe()) };
        return Err(FilterError { pos: t.pos, message: msg });
    }
    Ok(Some(e))
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    LParen,
    RParen,
    /// `=`, `==`, `!=`, `<`, `>`, `<=`, `>=`.
    Cmp(PortOp),
    /// `!`
    Bang,
    /// `&&` or `&`
    AndSym,
    /// `||` or `|`
    OrSym,
    Word(String),
}

#[derive(Clone, Debug)]
struct Token {
    kind: Tok,
    /// 1-based character position in the joined text.
    pos: usize,
}

impl Token {
    fn describe(&self) -> String {
        match &self.kind {
            Tok::LParen => "\"(\"".into(),
            Tok::RParen => "\")\"".into(),
            Tok::Cmp(op) => format!("\"{}\"", op_symbol(*op)),
            Tok::Bang => "\"!\"".into(),
            Tok::AndSym => "\"&&\"".into(),
            Tok::OrSym => "\"||\"".into(),
            Tok::Word(w) => format!("{w:?}"),
        }
    }

    fn word(&self) -> Option<&str> {
        if let Tok::Word(w) = &self.kind { Some(w) } else { None }
    }
}

fn is_special(c: char) -> bool {
    matches!(c, '(' | ')' | '=' | '!' | '<' | '>' | '&' | '|')
}

fn tokenize(text: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        let next = chars.get(i + 1).copied();
        let (kind, len) = match (c, next) {
            (c, _) if c.is_whitespace() => {
                i += 1;
                continue;
            }
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            ('=', Some('=')) => (Tok::Cmp(PortOp::Eq), 2),
            ('=', _) => (Tok::Cmp(PortOp::Eq), 1),
            ('!', Some('=')) => (Tok::Cmp(PortOp::Ne), 2),
            ('!', _) => (Tok::Bang, 1),
            ('<', Some('=')) => (Tok::Cmp(PortOp::Le), 2),
            ('<', _) => (Tok::Cmp(PortOp::Lt), 1),
            ('>', Some('=')) => (Tok::Cmp(PortOp::Ge), 2),
            ('>', _) => (Tok::Cmp(PortOp::Gt), 1),
            ('&', Some('&')) => (Tok::AndSym, 2),
            ('&', _) => (Tok::AndSym, 1),
            ('|', Some('|')) => (Tok::OrSym, 2),
            ('|', _) => (Tok::OrSym, 1),
            _ => {
                let start = i;
                while i < chars.len() && !chars[i].is_whitespace() && !is_special(chars[i]) {
                    i += 1;
                }
                out.push(Token { kind: Tok::Word(chars[start..i].iter().collect()), pos });
                continue;
            }
        };
        out.push(Token { kind, pos });
        i += len;
    }
    if out.len() > 10_000 {
        return Err(FilterError { pos: 1, message: "expression too long".into() });
    }
    Ok(out)
}

fn op_symbol(op: PortOp) -> &'static str {
    match op {
        PortOp::Eq => "=",
        PortOp::Ne => "!=",
        PortOp::Lt => "<",
        PortOp::Gt => ">",
        PortOp::Le => "<=",
        PortOp::Ge => ">=",
    }
}

fn word_op(w: &str) -> Option<PortOp> {
    Some(match w {
        "eq" => PortOp::Eq,
        "neq" | "ne" => PortOp::Ne,
        "lt" => PortOp::Lt,
        "gt" => PortOp::Gt,
        "le" => PortOp::Le,
        "ge" => PortOp::Ge,
        _ => return None,
    })
}

fn fail<T>(pos: usize, message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError { pos, message: message.into() })
}

/// Nesting limit, so a hostile expression cannot overflow the stack.
const MAX_DEPTH: usize = 100;

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    /// Position reported for "end of expression".
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        self.expr_at(0)
    }

    fn expr_at(&mut self, depth: usize) -> Result<Expr, FilterError> {
        if depth > MAX_DEPTH {
            let pos = self.peek().map_or(self.end, |t| t.pos);
            return fail(pos, "expression nested too deeply");
        }
        let mut left = self.and(depth)?;
        while let Some(t) = self.peek() {
            let is_or = t.kind == Tok::OrSym || t.word() == Some("or");
            if !is_or {
                break;
            }
            self.at += 1;
            let right = self.and(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let mut left = self.unary(depth)?;
        while let Some(t) = self.peek() {
            if t.kind == Tok::AndSym || t.word() == Some("and") {
                self.at += 1;
            } else if !self.starts_term() {
                break;
            }
            let right = self.unary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    /// Whether the next token can begin a term (implicit `and` between juxtaposed terms).
    fn starts_term(&self) -> bool {
        self.peek().is_some_and(|t| match &t.kind {
            Tok::LParen | Tok::Bang => true,
            Tok::Word(w) => matches!(w.as_str(), "not" | "sport" | "dport" | "src" | "dst"),
            _ => false,
        })
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let Some(t) = self.next() else {
            return fail(self.end, "expression ends where a condition was expected");
        };
        match &t.kind {
            Tok::Bang => Ok(Expr::Not(Box::new(self.unary_nested(depth)?))),
            Tok::Word(w) if w == "not" => Ok(Expr::Not(Box::new(self.unary_nested(depth)?))),
            Tok::LParen => {
                if self.peek().is_some_and(|n| n.kind == Tok::RParen) {
                    return fail(t.pos, "empty parentheses");
                }
                let e = self.expr_at(depth + 1)?;
                match self.next() {
                    Some(c) if c.kind == Tok::RParen => Ok(e),
                    Some(other) => fail(other.pos, format!("expected \")\" to close \"(\" at {}, found {}", t.pos, other.describe())),
                    None => fail(self.end, format!("missing \")\" to close \"(\" at {}", t.pos)),
                }
            }
            Tok::Word(w) => match w.as_str() {
                "sport" => self.port_cond(Side::Src, &t),
                "dport" => self.port_cond(Side::Dst, &t),
                "src" => self.host_cond(Side::Src, &t),
                "dst" => self.host_cond(Side::Dst, &t),
                _ => fail(t.pos, format!("unknown term {w:?} (expected sport, dport, src, dst, not or \"(\")")),
            },
            _ => fail(t.pos, format!("unexpected {} where a condition was expected", t.describe())),
        }
    }

    fn unary_nested(&mut self, depth: usize) -> Result<Expr, FilterError> {
        if depth > MAX_DEPTH {
            return fail(self.peek().map_or(self.end, |t| t.pos), "expression nested too deeply");
        }
        self.unary(depth + 1)
    }

    /// An optional comparison operator (symbol or word).
    fn op(&mut self) -> Option<(PortOp, Token)> {
        let t = self.peek()?.clone();
        let op = match &t.kind {
            Tok::Cmp(op) => *op,
            Tok::Word(w) => word_op(w)?,
            _ => return None,
        };
        self.at += 1;
        Some((op, t))
    }

    fn port_cond(&mut self, side: Side, kw: &Token) -> Result<Expr, FilterError> {
        let kw_text = kw.word().unwrap_or_default().to_owned();
        let (op, op_text) = match self.op() {
            Some((op, _)) => (op, format!("{kw_text} {}", op_symbol(op))),
            None => (PortOp::Eq, kw_text),
        };
        let Some(t) = self.next() else {
            return fail(self.end, format!("expected a port after \"{op_text}\" (like :8080)"));
        };
        let Some(w) = t.word() else {
            return fail(t.pos, format!("expected a port after \"{op_text}\" (like :8080), found {}", t.describe()));
        };
        let digits = w.strip_prefix("*:").or_else(|| w.strip_prefix(':')).unwrap_or(w);
        match parse_port(digits) {
            Some(port) => Ok(Expr::Port { side, op, port }),
            None => fail(t.pos, format!("{w:?} is not a port (expected :N with N from 0 to 65535)")),
        }
    }

    fn host_cond(&mut self, side: Side, kw: &Token) -> Result<Expr, FilterError> {
        let kw_text = kw.word().unwrap_or_default().to_owned();
        let negate = match self.op() {
            None | Some((PortOp::Eq, _)) => false,
            Some((PortOp::Ne, _)) => true,
            Some((op, t)) => {
                return fail(t.pos, format!("\"{}\" compares ports; {kw_text} takes =, == or != (or use {}port)", op_symbol(op), &kw_text[..1]));
            }
        };
        let Some(t) = self.next() else {
            return fail(self.end, format!("expected an address after \"{kw_text}\" (like 10.0.0.0/8, [::1]:80 or :8080)"));
        };
        let Some(w) = t.word() else {
            return fail(t.pos, format!("expected an address after \"{kw_text}\", found {}", t.describe()));
        };
        let cond = parse_host(w).map_err(|m| FilterError { pos: t.pos, message: format!("{w:?}: {m}") })?;
        let e = Expr::Host { side, cond };
        Ok(if negate { Expr::Not(Box::new(e)) } else { e })
    }
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok()
}

/// `a.b.c.d[/n][:port]`, `[v6][/n][:port]`, `[v6/n][:port]`, `v6[/n]`, `:port`, `*`, `*:port`.
fn parse_host(w: &str) -> Result<HostCond, String> {
    let port_of = |p: &str| -> Result<Option<u16>, String> {
        if p == "*" {
            return Ok(None);
        }
        parse_port(p).map(Some).ok_or_else(|| format!("{p:?} is not a port"))
    };
    if w == "*" {
        return Ok(HostCond { net: None, port: None });
    }
    if let Some(p) = w.strip_prefix("*:").or_else(|| w.strip_prefix(':')) {
        return Ok(HostCond { net: None, port: port_of(p)? });
    }
    if let Some(rest) = w.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("missing \"]\"")?;
        let (addr, mut prefix) = match inside.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (inside, None),
        };
        let (outer_prefix, after) = match after.strip_prefix('/') {
            Some(r) => r.split_once(':').map_or((Some(r), ""), |(p, _)| (Some(p), &after[p.len() + 1..])),
            None => (None, after),
        };
        if outer_prefix.is_some() {
            if prefix.is_some() {
                return Err("prefix length given twice".into());
            }
            prefix = outer_prefix;
        }
        let port = match after {
            "" => None,
            a => port_of(a.strip_prefix(':').ok_or("expected \":PORT\" after \"]\"")?)?,
        };
        let ip: Ipv6Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        return Ok(HostCond { net: Some(net(IpAddr::V6(ip), prefix)?), port });
    }
    if w.matches(':').count() > 1 {
        // Bare IPv6 (no port possible without brackets).
        let (addr, prefix) = w.split_once('/').map_or((w, None), |(a, p)| (a, Some(p)));
        let ip: Ipv6Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv6 address (write [ADDR]:PORT for a port)"))?;
        return Ok(HostCond { net: Some(net(IpAddr::V6(ip), prefix)?), port: None });
    }
    let (hostpart, port) = match w.split_once(':') {
        Some((h, p)) => (h, port_of(p)?),
        None => (w, None),
    };
    let (addr, prefix) = hostpart.split_once('/').map_or((hostpart, None), |(a, p)| (a, Some(p)));
    if addr == "*" {
        return Ok(HostCond { net: None, port });
    }
    let ip: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address (host names are not resolved)"))?;
    Ok(HostCond { net: Some(net(IpAddr::V4(ip), prefix)?), port })
}

fn net(addr: IpAddr, prefix: Option<&str>) -> Result<Net, String> {
    let width: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => width,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= width && !p.starts_with('+') => n,
            _ => return Err(format!("prefix length {p:?} is not between 0 and {width}")),
        },
    };
    Ok(Net { addr, prefix })
}

/// Fully parenthesised rendering (shows how an expression was grouped).
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |s: &Side, a: &'static str, b: &'static str| if *s == Side::Src { a } else { b };
        match self {
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Not(e) => write!(f, "not {e}"),
            Expr::Port { side: s, op, port } => write!(f, "{} {} :{port}", side(s, "sport", "dport"), op_symbol(*op)),
            Expr::Host { side: s, cond } => {
                write!(f, "{} ", side(s, "src", "dst"))?;
                match cond.net {
                    Some(Net { addr: IpAddr::V6(a), prefix }) => write!(f, "[{a}]/{prefix}")?,
                    Some(Net { addr: IpAddr::V4(a), prefix }) => write!(f, "{a}/{prefix}")?,
                    None => write!(f, "*")?,
                }
                match cond.port {
                    Some(p) => write!(f, ":{p}"),
                    None => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Expr {
        parse(&[s.to_owned()]).unwrap_or_else(|e| panic!("{s:?}: {e}")).unwrap()
    }

    fn show(s: &str) -> String {
        p(s).to_string()
    }

    fn err(s: &str) -> FilterError {
        parse(&[s.to_owned()]).expect_err(s)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_is_no_filter() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["  ".into()]).unwrap(), None);
    }

    #[test]
    fn precedence_not_and_or() {
        assert_eq!(
            show("sport = :1 or sport = :2 and not dport = :3"),
            "(sport = :1 or (sport = :2 and not dport = :3))"
        );
        assert_eq!(show("not sport = :1 and dport = :2"), "(not sport = :1 and dport = :2)");
        assert_eq!(show("sport = :1 and dport = :2 or dport = :3"), "((sport = :1 and dport = :2) or dport = :3)");
        // Left associative.
        assert_eq!(show("sport = :1 or sport = :2 or sport = :3"), "((sport = :1 or sport = :2) or sport = :3)");
        assert_eq!(show("! ! sport = :1"), "not not sport = :1");
    }

    #[test]
    fn parentheses_override_precedence() {
        assert_eq!(show("(sport = :1 or sport = :2) and dport = :3"), "((sport = :1 or sport = :2) and dport = :3)");
        assert_eq!(show("not (sport = :1 or sport = :2)"), "not (sport = :1 or sport = :2)");
        assert_eq!(show("((sport = :1))"), "sport = :1");
    }

    #[test]
    fn juxtaposition_is_and_and_symbols_work() {
        assert_eq!(show("sport = :1 dport = :2"), "(sport = :1 and dport = :2)");
        assert_eq!(show("sport=:1&&dport==:2||!(src 10.0.0.1)"), "((sport = :1 and dport = :2) or not src 10.0.0.1/32)");
        assert_eq!(show("(sport eq :1)|(dport neq :2)&src *:3"), "(sport = :1 or (dport != :2 and src *:3))");
    }

    #[test]
    fn arguments_are_joined() {
        let args: Vec<String> = ["sport", "=", ":80", "or", "(", "dport", ">=", "1024", ")"].iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(parse(&args).unwrap().unwrap().to_string(), "(sport = :80 or dport >= :1024)");
    }

    #[test]
    fn port_operators() {
        let l = sa("127.0.0.1:8080");
        let r = sa("127.0.0.1:40000");
        for (e, want) in [
            ("sport = :8080", true),
            ("sport == :8080", true),
            ("sport eq 8080", true),
            ("sport :8080", true),
            ("sport != :8080", false),
            ("sport neq :8080", false),
            ("sport < :8080", false),
            ("sport <= :8080", true),
            ("sport > :8079", true),
            ("sport >= :8081", false),
            ("sport lt :8081", true),
            ("sport ge :8080", true),
            ("dport > :32767", true),
            ("dport = :8080", false),
        ] {
            assert_eq!(p(e).matches(l, r), want, "{e}");
        }
    }

    #[test]
    fn host_conditions() {
        let l = sa("10.1.2.3:443");
        let r = sa("[2001:db8::7]:50000");
        for (e, want) in [
            ("src 10.1.2.3", true),
            ("src 10.0.0.0/8", true),
            ("src 10.0.0.0/8:443", true),
            ("src 10.0.0.0/8:444", false),
            ("src 10.1.2.3:443", true),
            ("src 11.0.0.0/8", false),
            ("src = 10.1.2.3", true),
            ("src != 10.1.2.3", false),
            ("src :443", true),
            ("src *:443", true),
            ("src *", true),
            ("src 0.0.0.0/0", true),
            ("dst [2001:db8::]/32", true),
            ("dst [2001:db8::/32]:50000", true),
            ("dst [2001:db8::/32]:1", false),
            ("dst 2001:db8::7", true),
            ("dst 2001:db9::/32", false),
            ("dst 10.0.0.0/8", false),
            ("dst [2001:db8::7]:50000", true),
        ] {
            assert_eq!(p(e).matches(l, r), want, "{e}");
        }
        // IPv4 networks match IPv4-mapped IPv6 addresses.
        let mapped = sa("[::ffff:192.168.1.5]:80");
        assert!(p("src 192.168.0.0/16").matches(mapped, r));
        assert!(!p("src 192.169.0.0/16").matches(mapped, r));
    }

    #[test]
    fn evaluation_follows_the_tree() {
        let l = sa("127.0.0.1:80");
        let r = sa("127.0.0.1:5000");
        assert!(p("sport = :81 or sport = :80 and dport = :5000").matches(l, r));
        assert!(!p("(sport = :81 or sport = :80) and dport = :5001").matches(l, r));
        assert!(p("not (sport = :81 or dport = :5001)").matches(l, r));
        assert!(!p("not sport = :80 or dport = :1").matches(l, r));
    }

    #[test]
    fn errors_name_the_problem_and_position() {
        assert_eq!(err("sport = :8080 )"), FilterError { pos: 15, message: "unbalanced \")\"".into() });
        assert_eq!(err("(sport = :1").message, "missing \")\" to close \"(\" at 1");
        assert_eq!(err("sport = :1 or").message, "expression ends where a condition was expected");
        assert_eq!(err("sport = http").message, "\"http\" is not a port (expected :N with N from 0 to 65535)");
        assert_eq!(err("sport = :70000").pos, 9);
        assert!(err("sport =").message.starts_with("expected a port after \"sport =\""));
        assert!(err("sport = (").message.contains("found \"(\""));
        assert!(err("foo = :1").message.starts_with("unknown term \"foo\""));
        assert_eq!(err("()").message, "empty parentheses");
        assert!(err("src < 10.0.0.1").message.contains("compares ports"));
        assert!(err("src 10.0.0.0/33").message.contains("prefix length"));
        assert!(err("src example.com").message.contains("not an IP address"));
        assert!(err("dst [::1").message.contains("missing \"]\""));
        assert!(err("sport = :1 and").message.contains("expression ends"));
        assert!(err("sport = :1 = :2").message.starts_with("unexpected \"=\""));
        assert!(err(")").message.contains("unexpected \")\""));
        let deep = format!("{}sport = :1{}", "(".repeat(500), ")".repeat(500));
        assert!(err(&deep).message.contains("nested too deeply"));
        let nots = format!("{}sport = :1", "not ".repeat(500));
        assert!(err(&nots).message.contains("nested too deeply"));
        // Every message is one line.
        for bad in ["(", "sport", "src [", "dst 1.2.3.4:x", "not", "sport > :1 or ) "] {
            assert!(!err(bad).to_string().contains('\n'), "{bad}");
        }
    }
}
