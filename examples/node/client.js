// HMI's public gRPC API from Node.js: the protos are loaded at run time (no code generation).
//
//   npm install
//   node client.js classify TENANT "text" ...
//   node client.js embed TENANT "text" ...
//   node client.js generate TENANT "prompt" [MAX_NEW_TOKENS] [SEED]
//
// HMI_GATEWAY_ADDR says where the gateway listens (default 127.0.0.1:50051); HMI_TOKEN holds the credential
// (an API key from `hmi key create`, or the admin token), sent as `authorization: Bearer <key>` metadata;
// HMI_TLS_CA, a PEM file, makes the connection TLS; HMI_PROTOS says where the repository's protos/ folder
// is (default: ../../protos beside this file). Only public protos are loaded:
// hmi/v1/gateway.proto imports hmi/v1/catalog.proto and hmi/v1/tensor.proto, nothing internal.
// Every command prints one JSON line per result; a failed call prints "error: CODE: message" and exits 1.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = process.env.HMI_PROTOS || path.join(__dirname, '..', '..', 'protos');
const definition = protoLoader.loadSync(path.join(PROTOS, 'hmi', 'v1', 'gateway.proto'), {
  includeDirs: [PROTOS],
  keepCase: true,     // field names as in the .proto (tenant_id, max_new_tokens)
  longs: String,      // 64-bit integers (the seed) as strings
  enums: String,
  defaults: true,
  oneofs: true,
});
const hmi = grpc.loadPackageDefinition(definition).hmi.v1;
const gateway = new hmi.Gateway(process.env.HMI_GATEWAY_ADDR || '127.0.0.1:50051',
                                process.env.HMI_TLS_CA
                                  ? grpc.credentials.createSsl(fs.readFileSync(process.env.HMI_TLS_CA))
                                  : grpc.credentials.createInsecure());

function credentials() {               // every call carries the key
  const metadata = new grpc.Metadata();
  if (process.env.HMI_TOKEN) metadata.set('authorization', `Bearer ${process.env.HMI_TOKEN}`);
  return metadata;
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function fail(error) {
  const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) || error.code;
  console.error(`error: ${code}: ${error.details || error.message}`);
  process.exit(1);
}

function classify(tenant, texts) {
  gateway.Classify({ tenant_id: tenant, texts }, credentials(), { deadline: deadline(30) }, (error, reply) => {
    if (error) return fail(error);
    reply.results.forEach((result, index) => {
      const probabilities = {};
      result.labels.forEach((label, j) => { probabilities[label] = result.probabilities[j]; });
      console.log(JSON.stringify({ text: texts[index], label: result.label, probabilities }));
    });
  });
}

function embed(tenant, texts) {
  gateway.Embed({ tenant_id: tenant, texts }, credentials(), { deadline: deadline(30) }, (error, reply) => {
    if (error) return fail(error);
    reply.embeddings.forEach((embedding, index) => {
      console.log(JSON.stringify({ text: texts[index], embedding: embedding.values }));
    });
  });
}

function generate(tenant, prompt, maxNewTokens, seed) {
  const request = { tenant_id: tenant, prompt, max_new_tokens: Number(maxNewTokens || 32) };
  if (seed !== undefined) {
    request.seed = String(seed);
    request.temperature = 0.8;
  }
  const stream = gateway.Generate(request, credentials(), { deadline: deadline(120) });
  let text = '';
  let pieces = 0;
  let finishReason = '';
  stream.on('data', (message) => {      // text arrives piece by piece as the tenant generates it
    text += message.text;
    pieces += 1;
    finishReason = message.finish_reason || finishReason;
    process.stderr.write(message.text);
  });
  stream.on('error', fail);
  stream.on('end', () => {
    process.stderr.write('\n');
    console.log(JSON.stringify({ text, pieces, finish_reason: finishReason }));
  });
}

const [command, tenant, ...rest] = process.argv.slice(2);
if (command === 'classify' && tenant && rest.length) classify(tenant, rest);
else if (command === 'embed' && tenant && rest.length) embed(tenant, rest);
else if (command === 'generate' && tenant && rest.length) generate(tenant, rest[0], rest[1], rest[2]);
else {
  console.error('usage: node client.js classify|embed TENANT TEXT... | generate TENANT PROMPT [MAX_NEW_TOKENS] [SEED]');
  process.exit(2);
}
