// Peer: Node `ws` (npm), fan-out by sending one pre-encoded Buffer to every other member.
'use strict';

const { WebSocketServer } = require('ws');

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : fallback;
};
const host = option('host', '127.0.0.1');
const port = Number(option('port'));
if (!port) {
  console.error('usage: node node_ws.js --port PORT [--host HOST]');
  process.exit(2);
}

const channels = new Map(); // channel -> Set of sockets

const wss = new WebSocketServer({ host, port, backlog: 4096, perMessageDeflate: false, maxPayload: 65536, clientTracking: false });

wss.on('connection', (ws) => {
  const joined = [];
  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const channel = frame && frame.data && frame.data.channel;
    if (typeof channel !== 'string') return;
    if (frame.event === 'subscribe') {
      let members = channels.get(channel);
      if (!members) channels.set(channel, (members = new Set()));
      if (!members.has(ws)) {
        members.add(ws);
        joined.push(channel);
      }
      ws.send(JSON.stringify({ event: 'subscribed', channel }));
    } else if (frame.event === 'publish') {
      const members = channels.get(channel);
      if (!members) return;
      const out = Buffer.from(JSON.stringify({ event: 'message', channel, data: frame.data.payload }));
      for (const member of members) {
        if (member !== ws) member.send(out, { binary: false });
      }
    }
  });
  ws.on('close', () => {
    for (const channel of joined) {
      const members = channels.get(channel);
      if (members) {
        members.delete(ws);
        if (members.size === 0) channels.delete(channel);
      }
    }
  });
  ws.on('error', () => {});
});

wss.on('listening', () => {
  const version = require('ws/package.json').version;
  console.error(`node-ws peer listening on ws://${host}:${port}/ (ws ${version}, node ${process.version})`);
});
process.on('SIGTERM', () => process.exit(0));
