// A wasd provider in JavaScript: a static table of endpoints from the provider's settings.
//
// Settings (the provider's `settings` table in the host config, handed over as JSON):
//
//   {"services": {"basket": [{"host": "10.0.0.7", "port": 8443, "scheme": "https"},
//                            {"host": "10.0.0.8", "port": 9000, "name": "dashboard"}]},
//    "ttl-ms": 5000}
//
// Endpoint keys: `host` (required), `port`, `scheme`, `name`, `path`, `metadata`.
// `_dashboard.basket` asks for the endpoints named `dashboard`, `basket` for the unnamed.
//
// How componentize-js maps the WIT (wit/provider.wit): records are plain objects with
// camelCase fields (`endpointName`, `ttlMs`); `option<T>` is the value or `undefined`
// (`null` works too); a `tuple` is an array; a `variant` is `{ tag: 'invalid-settings',
// val: '...' }`; an enum is its case name as a string (`'debug'`); a `u64` takes a number
// or a BigInt. Integers are not range-checked on the way out (70000 as a `u16` arrives
// as 4464): check them yourself. A function returning `result<T, error>` returns T for
// `ok` and throws for `err`: a thrown object with a `payload` property sends that payload
// as the error (so does a thrown plain `{ tag, val }`), while a thrown `Error` without one
// (a bug, say) traps the instance.

import { log } from 'wasd:provider/log@0.1.0';

/** An `error` variant of wit/provider.wit, thrown out of an export as its `err`. */
class ProviderError extends Error {
  constructor(tag, message) {
    super(message);
    this.payload = { tag, val: message };
  }
}

/** Settings that make no sense; the message names the place. */
const invalid = (message) => new ProviderError('invalid-settings', message);

// Set by configure: lower-cased service name -> [{ name (lower-cased or undefined), endpoint }].
let services;
let ttlMs;

export const resolver = {
  configure(config) {
    ({ services, ttlMs } = parseSettings(config.settings));
  },

  resolve(query) {
    if (services === undefined) throw new ProviderError('internal', 'called before configure');
    const name = query.endpointName?.toLowerCase();
    const endpoints = (services.get(query.service.toLowerCase()) ?? [])
      .filter((entry) => entry.name === name)
      .map((entry) => entry.endpoint)
      // An endpoint without a scheme suits any; the host orders by preference.
      .filter((e) => query.schemes.length === 0 || e.scheme === undefined || query.schemes.includes(e.scheme));
    log('debug', `${query.service}: ${endpoints.length} endpoints`);
    // No endpoints: the host asks the next provider.
    return { endpoints, ttlMs, version: undefined };
  },

  watch(_query, _version, _timeoutMs) {
    throw new ProviderError('unsupported', 'this provider does not watch; the host polls it');
  },
};

/** Errors name the place: `services.basket[1].port: expected an integer 0..65535, got "x"`. */
function parseSettings(text) {
  let settings;
  try {
    settings = JSON.parse(text);
  } catch (e) {
    throw invalid(`settings: not valid JSON: ${e.message}`);
  }
  const table = { services: new Map(), ttlMs: undefined };
  for (const [key, value] of Object.entries(object(settings, 'settings'))) {
    if (key === 'ttl-ms') {
      table.ttlMs = integer(value, Number.MAX_SAFE_INTEGER, 'a non-negative integer', key);
    } else if (key === 'services') {
      for (const [service, items] of Object.entries(object(value, key))) {
        const at = `services.${service}`;
        if (!Array.isArray(items)) throw invalid(`${at}: expected a list of endpoints, got ${got(items)}`);
        if (table.services.has(service.toLowerCase())) {
          throw invalid(`${at}: duplicate service (names are case-insensitive)`);
        }
        table.services.set(service.toLowerCase(), items.map((item, i) => endpoint(item, `${at}[${i}]`)));
      }
    } else {
      throw invalid(`${key}: unknown key (expected "services" or "ttl-ms")`);
    }
  }
  return table;
}

function endpoint(value, at) {
  const fields = object(value, at);
  if (!Object.hasOwn(fields, 'host')) throw invalid(`${at}: missing "host"`);
  const host = fields.host;
  if (typeof host !== 'string' || host === '') {
    throw invalid(`${at}.host: expected a non-empty string, got ${got(host)}`);
  }
  let name;
  const endpoint = { scheme: undefined, host, port: undefined, path: undefined, metadata: [] };
  for (const [key, value] of Object.entries(fields)) {
    const where = `${at}.${key}`;
    switch (key) {
      case 'host':
        break;
      case 'port':
        endpoint.port = integer(value, 65535, 'an integer 0..65535', where);
        break;
      case 'scheme':
        endpoint.scheme = string(value, where).toLowerCase();
        break;
      case 'name':
        name = string(value, where).toLowerCase();
        break;
      case 'path':
        endpoint.path = string(value, where);
        break;
      case 'metadata':
        endpoint.metadata = Object.entries(object(value, where)).map(([k, v]) => [k, string(v, `${where}.${k}`)]);
        break;
      default:
        throw invalid(`${where}: unknown key`);
    }
  }
  return { name, endpoint };
}

function object(value, at) {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw invalid(`${at}: expected an object, got ${got(value)}`);
  }
  return value;
}

function string(value, at) {
  if (typeof value !== 'string') throw invalid(`${at}: expected a string, got ${got(value)}`);
  return value;
}

/** An integer in 0..=max (JSON's 8443.0 is the number 8443 here). */
function integer(value, max, expected, at) {
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw invalid(`${at}: expected ${expected}, got ${got(value)}`);
  }
  return value;
}

/** How an error message shows a value: scalars as JSON, containers by kind. */
function got(value) {
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object' && value !== null) return 'an object';
  return JSON.stringify(value);
}
