// node-postgres through pgproxy, default settings: named (prepared) queries used many
// times, a pg-cursor read in batches inside a transaction, and who the database thinks
// we are. Usage: node client.mjs PORT USER   (the token comes from $PGPASSWORD)
import pg from "pg";
import Cursor from "pg-cursor";

const [port, user] = process.argv.slice(2);
const client = new pg.Client({ host: "127.0.0.1", port: Number(port), user, database: "demo",
                               password: process.env.PGPASSWORD });
await client.connect();
const out = {};
const who = { name: "who-am-i", text: "SELECT current_user AS role, current_setting('pgproxy.user') AS person, $1::int AS n" };
out.named = [];
for (let i = 0; i < 12; i++) {
  const res = await client.query({ ...who, values: [i] });
  out.named.push(`${res.rows[0].role}|${res.rows[0].person}|${res.rows[0].n}`);
}
await client.query("BEGIN");
const cursor = client.query(new Cursor("SELECT g FROM generate_series(1, $1::int) AS g", [250]));
let total = 0, batches = 0;
for (;;) {
  const rows = await cursor.read(100);
  if (rows.length === 0) break;
  total += rows.reduce((sum, r) => sum + r.g, 0);
  batches += 1;
}
await cursor.close();
await client.query("COMMIT");
out.cursor = { total, batches };
await client.end();
console.log(JSON.stringify(out));
