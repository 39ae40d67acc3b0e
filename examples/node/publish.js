#!/usr/bin/env node
// Publish one JSON event to ingest from Node.js: unary ingest.v1.Ingest/Publish with
// @grpc/grpc-js, the proto loaded at run time from ../../proto with
// @grpc/proto-loader (no generated code).
//
//   npm ci --prefix examples/node
//   INGEST_ADDR=127.0.0.1:50051 node examples/node/publish.js [--topic T] [--id ID]
//
// The event gets its id before the first attempt and keeps it on every retry: it
// becomes the AMQP message_id, so consumers can drop the duplicate an ambiguous
// failure (a connection lost before the confirm came back) may cause.
// RESOURCE_EXHAUSTED (the server's buffer is full) and UNAVAILABLE (broker away,
// server draining) carry a google.rpc.RetryInfo in grpc-status-details-bin: the
// client waits that long and sends again; DEADLINE_EXCEEDED and ABORTED are retried
// too, with exponential backoff when the server gave no delay. Any other error is
// about the event itself (INVALID_ARGUMENT, FAILED_PRECONDITION for an unroutable
// topic, ...): no retry, the violations are printed.
//
// Output: the confirmed id on stdout; progress and errors on stderr. Exit status 0
// only when the event was confirmed, 1 otherwise, 2 for bad arguments or missing
// dependencies.
'use strict';

const path = require('node:path');
const crypto = require('node:crypto');
const { parseArgs } = require('node:util');

const PROG = 'publish.js';
const INSTALL_HINT = 'npm ci --prefix examples/node';
const USAGE = `usage: INGEST_ADDR=host:port node ${PROG} [--topic T] [--id ID] [--max-attempts N] [--timeout SECONDS]`;
const HELP = `${USAGE}

Publish one JSON event to ingest (ingest.v1.Ingest/Publish) and wait for the broker's
confirm, retrying with the same id after the server's RetryInfo delay.

options:
  --addr HOST:PORT    server address (default: $INGEST_ADDR or 127.0.0.1:50051)
  --topic T           topic, the AMQP routing key (default: examples.node)
  --id ID             event id, the AMQP message_id (default: node-<random uuid>)
  --max-attempts N    attempts at most (default: 20)
  --timeout SECONDS   deadline of each attempt (default: 30)
  -h, --help          show this help and exit

Prints the confirmed id on stdout, progress and errors on stderr. Exit status: 0 when
the event was confirmed, 1 when it was not, 2 for bad arguments or missing packages
(${INSTALL_HINT}).`;

// --help works before the packages are installed.
if (process.argv.slice(2).some((a) => a === '--help' || a === '-h')) {
  console.log(HELP);
  process.exit(0);
}

let grpc, protoLoader, protobuf;
try {
  grpc = require('@grpc/grpc-js');
  protoLoader = require('@grpc/proto-loader');
  protobuf = require('protobufjs');
} catch (e) {
  console.error(`${PROG}: ${e.message.split('\n')[0]}; install the dependencies: ${INSTALL_HINT}`);
  process.exit(2);
}

// The proto tree this example belongs to. `includeDirs` resolves the import of
// google/protobuf/timestamp.proto too: protobufjs (under proto-loader) bundles the
// well-known types.
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'ingest/v1/ingest.proto';

const RETRYABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.ABORTED,
]);
// Backoff when a retryable status carries no RetryInfo: doubles per attempt, capped.
const BACKOFF_FIRST_MS = 100;
const BACKOFF_MAX_MS = 5000;

// The google.rpc messages the server puts in grpc-status-details-bin, declared
// here (field numbers from google/rpc/status.proto and error_details.proto) so no
// extra package is needed to read them.
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
            Duration: { fields: { seconds: { type: 'int64', id: 1 }, nanos: { type: 'int32', id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: 'google.protobuf.Duration', id: 1 } } },
            BadRequest: {
              fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
                },
              },
            },
            PreconditionFailure: {
              fields: { violations: { rule: 'repeated', type: 'Violation', id: 1 } },
              nested: {
                Violation: {
                  fields: {
                    type: { type: 'string', id: 1 },
                    subject: { type: 'string', id: 2 },
                    description: { type: 'string', id: 3 },
                  },
                },
              },
            },
          },
        },
      },
    },
  },
});
const Status = rpcTypes.lookupType('google.rpc.Status');
const DETAIL_TYPES = ['RetryInfo', 'BadRequest', 'PreconditionFailure'].map((name) =>
  rpcTypes.lookupType(`google.rpc.${name}`),
);

/** The google.rpc details of a failed call: [{ type: 'RetryInfo', value }, ...]. */
function statusDetails(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return [];
  let status;
  try {
    status = Status.decode(raw);
  } catch {
    return [];
  }
  const details = [];
  for (const any of status.details) {
    const type = DETAIL_TYPES.find((t) => any.type_url === `type.googleapis.com/google.rpc.${t.name}`);
    if (type) details.push({ type: type.name, value: type.decode(any.value) });
  }
  return details;
}

/** Milliseconds from google.rpc.RetryInfo, or null. */
function retryDelayMs(details) {
  const info = details.find((d) => d.type === 'RetryInfo');
  if (!info || !info.value.retry_delay) return null;
  const { seconds, nanos } = info.value.retry_delay;
  return Number(seconds || 0) * 1000 + Math.round((nanos || 0) / 1e6);
}

function explain(err, details) {
  const lines = [`${grpc.status[err.code]}: ${err.details}`];
  for (const d of details) {
    if (d.type === 'BadRequest') {
      for (const v of d.value.field_violations) lines.push(`  ${v.field}: ${v.description}`);
    } else if (d.type === 'PreconditionFailure') {
      for (const v of d.value.violations) lines.push(`  ${v.type} ${v.subject}: ${v.description}`);
    }
  }
  return lines.join('\n');
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function publishOnce(client, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client.Publish(request, { deadline: new Date(Date.now() + timeoutMs) }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

/** Publish with retries as the server asks; resolves to the response or throws. */
async function publishWithRetry(client, request, { maxAttempts, timeoutMs }) {
  let backoff = BACKOFF_FIRST_MS;
  for (let attempt = 1; ; attempt++) {
    try {
      return await publishOnce(client, request, timeoutMs);
    } catch (err) {
      if (err.code === undefined) throw err;
      const details = statusDetails(err);
      if (!RETRYABLE.has(err.code)) {
        throw new Error(`refused: ${explain(err, details)}`);
      }
      if (attempt >= maxAttempts) {
        throw new Error(
          `gave up after ${attempt} attempts, the last ended with ${grpc.status[err.code]} (${err.details})`,
        );
      }
      let delay = retryDelayMs(details);
      if (delay === null) {
        delay = Math.round(backoff * (0.5 + Math.random() / 2));
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      }
      console.error(
        `${PROG}: attempt ${attempt} ended with ${grpc.status[err.code]} (${err.details}); ` +
          `retrying in ${delay} ms with the same id`,
      );
      await sleep(delay);
    }
  }
}

function usage(message) {
  console.error(`${PROG}: ${message}`);
  console.error(`${USAGE}\n(--help for more)`);
  process.exit(2);
}

async function main() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        addr: { type: 'string', default: process.env.INGEST_ADDR || '127.0.0.1:50051' },
        topic: { type: 'string', default: 'examples.node' },
        id: { type: 'string', default: `node-${crypto.randomUUID()}` },
        'max-attempts': { type: 'string', default: '20' },
        timeout: { type: 'string', default: '30' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (e) {
    usage(e.message);
  }
  const maxAttempts = Number(values['max-attempts']);
  const timeoutMs = Number(values.timeout) * 1000;
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1 || !(timeoutMs > 0)) {
    usage('--max-attempts must be an integer >= 1 and --timeout > 0');
  }

  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: false, // contentType, not content_type
    longs: String,
    enums: String,
    defaults: true,
  });
  const { Ingest } = grpc.loadPackageDefinition(definition).ingest.v1;
  // The shipped gRPC service config: grpc-js's own retry for Publish (UNAVAILABLE and
  // RESOURCE_EXHAUSTED, honouring the server's grpc-retry-pushback-ms).
  const serviceConfig = require('node:fs').readFileSync(
    path.join(PROTO_ROOT, 'ingest/v1/service_config.json'),
    'utf8',
  );
  const client = new Ingest(values.addr, grpc.credentials.createInsecure(), {
    'grpc.service_config': serviceConfig,
    'grpc.enable_retries': 1,
  });

  const now = Date.now();
  const event = {
    id: values.id,
    topic: values.topic,
    payload: Buffer.from(JSON.stringify({ kind: 'unary', source: PROG, at: new Date(now).toISOString() })),
    contentType: 'application/json',
    attributes: { source: PROG },
    time: { seconds: String(Math.floor(now / 1000)), nanos: (now % 1000) * 1e6 },
  };

  try {
    const response = await publishWithRetry(client, { events: [event] }, { maxAttempts, timeoutMs });
    if (response.ids.length !== 1 || response.ids[0] !== event.id) {
      throw new Error(`answered ids ${JSON.stringify(response.ids)}, sent [${event.id}]`);
    }
    console.log(event.id);
    console.error(`${PROG}: 1 of 1 events confirmed by ${values.addr}`);
    return 0;
  } catch (e) {
    console.error(`${PROG}: Publish of ${event.id} ${e.message}`);
    console.error(`${PROG}: 0 of 1 events confirmed; retry with the same id`);
    return 1;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    console.error(`${PROG}: ${e.stack || e}`);
    process.exitCode = 1;
  },
);
