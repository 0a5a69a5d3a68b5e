"""
The standard PAC functions (Netscape's, and Microsoft's C{Ex} variants),
written in JavaScript and run in the PAC helper before the site's script.

The look-ups (C{dnsResolve}, C{dnsResolveEx}, C{myIpAddress},
C{myIpAddressEx}) and the address arithmetic of the C{Ex} variants
(C{isInNetEx}, C{sortIpAddressList}: IPv6 too) call back into the helper's
Python, as C{_shifter_*} functions the engine is given.
"""

PAC_FUNCTIONS = r"""
function isPlainHostName(host) {
  return String(host).indexOf('.') == -1;
}
function dnsDomainIs(host, domain) {
  host = String(host); domain = String(domain);
  return host.length >= domain.length &&
    host.substring(host.length - domain.length) == domain;
}
function localHostOrDomainIs(host, hostdom) {
  host = String(host); hostdom = String(hostdom);
  return host == hostdom || hostdom.lastIndexOf(host + '.', 0) == 0;
}
function dnsDomainLevels(host) {
  return String(host).split('.').length - 1;
}
function shExpMatch(str, shexp) {
  var re = String(shexp).replace(/[.+^${}()|[\]\\\/]/g, '\\$&')
    .replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp('^' + re + '$').test(String(str));
}
function dnsResolve(host) {
  var a = _shifter_dnsResolve(String(host));
  return a ? a : null;
}
function dnsResolveEx(host) {
  return _shifter_dnsResolveEx(String(host));
}
function myIpAddress() {
  return _shifter_myIpAddress();
}
function myIpAddressEx() {
  return _shifter_myIpAddressEx();
}
function isResolvable(host) {
  return !!dnsResolve(host);
}
function isResolvableEx(host) {
  return dnsResolveEx(host) != '';
}
function _shifter_v4(text) {
  var m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(String(text));
  if (!m) return null;
  var n = 0;
  for (var i = 1; i <= 4; i++) {
    var b = parseInt(m[i], 10);
    if (b > 255) return null;
    n = n * 256 + b;
  }
  return n;
}
function isInNet(ipaddr, pattern, maskstr) {
  var host = _shifter_v4(ipaddr);
  if (host === null) {
    var resolved = dnsResolve(ipaddr);
    if (!resolved) return false;
    host = _shifter_v4(resolved);
    if (host === null) return false;
  }
  var pat = _shifter_v4(pattern), mask = _shifter_v4(maskstr);
  if (pat === null || mask === null) return false;
  var hi = Math.floor(host / 65536), lo = host % 65536;
  var phi = Math.floor(pat / 65536), plo = pat % 65536;
  var mhi = Math.floor(mask / 65536), mlo = mask % 65536;
  return (hi & mhi) == (phi & mhi) && (lo & mlo) == (plo & mlo);
}
function isInNetEx(ipaddr, prefix) {
  return _shifter_isInNetEx(String(ipaddr), String(prefix));
}
function sortIpAddressList(list) {
  return _shifter_sortIpAddressList(String(list));
}
function getClientVersion() {
  return '1.0';
}
var _shifter_days = ['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
var _shifter_months = ['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];
function _shifter_gmt(args) {
  var n = args.length;
  if (n > 0 && args[n - 1] === 'GMT') {
    return {gmt: true, args: Array.prototype.slice.call(args, 0, n - 1)};
  }
  return {gmt: false, args: Array.prototype.slice.call(args, 0)};
}
function weekdayRange() {
  var a = _shifter_gmt(arguments), now = new Date();
  var today = a.gmt ? now.getUTCDay() : now.getDay();
  var first = _shifter_days.indexOf(String(a.args[0]));
  var last = a.args.length > 1 ? _shifter_days.indexOf(String(a.args[1])) : first;
  if (first < 0 || last < 0) return false;
  if (first <= last) return first <= today && today <= last;
  return today >= first || today <= last;
}
function _shifter_inRange(value, low, high) {
  if (low <= high) return low <= value && value <= high;
  return value >= low || value <= high;
}
function dateRange() {
  var a = _shifter_gmt(arguments), args = a.args, now = new Date();
  var d = a.gmt ? now.getUTCDate() : now.getDate();
  var m = a.gmt ? now.getUTCMonth() : now.getMonth();
  var y = a.gmt ? now.getUTCFullYear() : now.getFullYear();
  function kind(v) {
    if (typeof v === 'string' && _shifter_months.indexOf(v) >= 0) return 'month';
    v = Number(v);
    if (v >= 1000) return 'year';
    if (v >= 1 && v <= 31) return 'day';
    return null;
  }
  function val(v, k) { return k == 'month' ? _shifter_months.indexOf(v) : Number(v); }
  var parts = [];
  for (var i = 0; i < args.length; i++) {
    var k = kind(args[i]);
    if (k === null) return false;
    parts.push([k, val(args[i], k)]);
  }
  var cur = {day: d, month: m, year: y};
  if (parts.length == 1) return cur[parts[0][0]] == parts[0][1];
  if (parts.length % 2 != 0) return false;
  var half = parts.length / 2, lo = parts.slice(0, half), hi = parts.slice(half);
  function key(ps, fill) {
    var o = {year: fill.year, month: fill.month, day: fill.day};
    for (var j = 0; j < ps.length; j++) o[ps[j][0]] = ps[j][1];
    return o;
  }
  var kinds = lo.map(function (p) { return p[0]; }).join(',');
  if (kinds == 'day') return _shifter_inRange(d, lo[0][1], hi[0][1]);
  if (kinds == 'month') return _shifter_inRange(m, lo[0][1], hi[0][1]);
  if (kinds == 'year') return _shifter_inRange(y, lo[0][1], hi[0][1]);
  var from = key(lo, cur), to = key(hi, cur);
  function num(o) { return (o.year * 12 + o.month) * 32 + o.day; }
  var hasYear = kinds.indexOf('year') >= 0;
  if (hasYear) return num(from) <= num(cur) && num(cur) <= num(to);
  function md(o) { return o.month * 32 + o.day; }
  return _shifter_inRange(md(cur), md(from), md(to));
}
function timeRange() {
  var a = _shifter_gmt(arguments), args = a.args, now = new Date();
  var h = a.gmt ? now.getUTCHours() : now.getHours();
  var mi = a.gmt ? now.getUTCMinutes() : now.getMinutes();
  var s = a.gmt ? now.getUTCSeconds() : now.getSeconds();
  var n = args.map(Number);
  for (var i = 0; i < n.length; i++) if (isNaN(n[i])) return false;
  if (n.length == 1) return h == n[0];
  if (n.length == 2) return n[0] == n[1] ? h == n[0] : _shifter_inRange(h, n[0], (n[1] + 23) % 24);
  var cur = h * 3600 + mi * 60 + s, from, to;
  if (n.length == 4) { from = n[0] * 3600 + n[1] * 60; to = n[2] * 3600 + n[3] * 60 + 59; }
  else if (n.length == 6) { from = n[0] * 3600 + n[1] * 60 + n[2]; to = n[3] * 3600 + n[4] * 60 + n[5]; }
  else return false;
  return _shifter_inRange(cur, from, to);
}
"""
