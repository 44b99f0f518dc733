// node-postgres (pg) against envelope: a clear view, and raw enc_bytea values
// written back in text and in binary format.
//
// Needs the dev environment (eval "$(test/devenv up)"): pg reads PGHOST (the
// socket directory), PGPORT, PGDATABASE and PGUSER.  Makes and drops the
// table clients_node.  Run: node --test test/clients/test_node.js
// (test/clients/run installs pg with npm ci first).
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const pg = require('pg');

const TABLE = 'clients_node';
const VIEW = 'clients_node_clear';
const SSN = '123-45-6789 node secret';
const CARD = '4111-1111-1111-1111 node card';
const BLOB = Buffer.from([0, 1, 0x6e, 0x6f, 0x64, 0x65, 0xff, 0]);

let client;

function rawOf(textForm) {
  assert.ok(textForm.startsWith('enc:'), 'text form starts with enc:');
  return Buffer.from(textForm.slice(4), 'base64');
}

// The stored value holds no plaintext, in its text form or in its bytes.
function assertHidden(textForm, ...secrets) {
  const raw = rawOf(textForm);
  for (const s of secrets) {
    const b = Buffer.isBuffer(s) ? s : Buffer.from(s, 'utf8');
    assert.equal(raw.indexOf(b), -1, 'plaintext in the stored bytes');
    if (!Buffer.isBuffer(s)) {
      assert.equal(textForm.indexOf(s), -1, 'plaintext in the text form');
    }
  }
}

async function insert(name, ssn, card, blob) {
  const r = await client.query(
    `INSERT INTO ${VIEW} (name, ssn, card, blob) VALUES ($1, $2, $3, $4) RETURNING id, name, ssn, card, blob, created_at`,
    [name, ssn, card, blob]);
  return r.rows[0];
}

before(async () => {
  for (const v of ['PGHOST', 'PGPORT', 'PGDATABASE', 'PGUSER']) {
    if (!process.env[v]) {
      throw new Error(`${v} is not set; start the dev environment: eval "$(test/devenv up)"`);
    }
  }
  client = new pg.Client({ application_name: 'envelope clients test (node)' });
  await client.connect();
  await client.query(`DO $$ BEGIN IF to_regclass('${VIEW}') IS NOT NULL THEN
                      PERFORM envelope.drop_clear_view('${VIEW}'); END IF; END $$`);
  await client.query(`DROP TABLE IF EXISTS ${TABLE}`);
  await client.query(`CREATE TABLE ${TABLE} (id serial PRIMARY KEY, name text NOT NULL, ssn enc_bytea,
                      card enc_bytea, blob enc_bytea, created_at timestamptz NOT NULL DEFAULT now())`);
  await client.query(`SELECT envelope.set_clear_column('${TABLE}', 'card', 'text',
                      $$convert_to('${TABLE}:' || id, 'UTF8')$$)`);
  await client.query(`SELECT envelope.set_clear_column('${TABLE}', 'blob', 'bytea')`);
  await client.query(`SELECT envelope.create_clear_view('${TABLE}')`);
});

after(async () => {
  if (client) {
    await client.query(`SELECT envelope.drop_clear_view('${VIEW}')`);
    await client.query(`DROP TABLE ${TABLE}`);
    await client.end();
  }
});

test('insert, read, update and delete through the clear view', async () => {
  const row = await insert('ann', SSN, CARD, BLOB);
  assert.equal(typeof row.id, 'number');          // serial, through RETURNING
  assert.ok(row.created_at instanceof Date);      // the table's default, through RETURNING
  assert.equal(row.ssn, SSN);
  assert.equal(row.card, CARD);
  assert.deepEqual(row.blob, BLOB);

  const back = (await client.query(`SELECT name, ssn, card, blob FROM ${VIEW} WHERE id = $1`, [row.id])).rows[0];
  assert.deepEqual(back, { name: 'ann', ssn: SSN, card: CARD, blob: BLOB });

  const stored = (await client.query(
    `SELECT ssn::text AS ssn, card::text AS card, blob::text AS blob, envelope.kek_of(ssn) AS kek FROM ${TABLE} WHERE id = $1`,
    [row.id])).rows[0];
  assert.equal(stored.kek, 'pii');
  for (const v of [stored.ssn, stored.card, stored.blob]) {
    assertHidden(v, SSN, CARD, BLOB);
  }

  const upd = await client.query(`UPDATE ${VIEW} SET name = $1 WHERE id = $2 RETURNING name, ssn, card`, ['anna', row.id]);
  assert.deepEqual(upd.rows, [{ name: 'anna', ssn: SSN, card: CARD }]);
  const after = (await client.query(`SELECT ssn::text AS ssn, card::text AS card FROM ${TABLE} WHERE id = $1`, [row.id])).rows[0];
  assert.deepEqual(after, { ssn: stored.ssn, card: stored.card }, 'unchanged columns keep their ciphertext');

  const del = await client.query(`DELETE FROM ${VIEW} WHERE id = $1 RETURNING ssn`, [row.id]);
  assert.deepEqual(del.rows, [{ ssn: SSN }]);
  assert.equal((await client.query(`SELECT count(*)::int AS n FROM ${TABLE} WHERE id = $1`, [row.id])).rows[0].n, 0);
});

for (const binary of [false, true]) {
  const mode = binary ? 'binary' : 'text';

  // Text: the value as a string ("enc:" + base64), written back as a string.
  // Binary: the raw bytes (enc_bytea_send, the type's binary output, comes
  // back as a bytea Buffer), written back as a Buffer, which pg sends in
  // binary format, so the server reads it with enc_bytea's receive function.
  // (pg's `binary: true` result mode is not used: it decodes every result
  // field as UTF-8 and corrupts binary values, node-postgres issue #3495.)
  test(`raw values copied to another row (${mode} format)`, async () => {
    const a = (await insert(`a-${mode}`, SSN, CARD, BLOB)).id;
    const b = (await insert(`b-${mode}`, 'other', 'other card', null)).id;

    const r = await client.query(
      `SELECT ssn, card, enc_bytea_send(ssn) AS ssn_bin, enc_bytea_send(card) AS card_bin FROM ${TABLE} WHERE id = $1`,
      [a]);
    const ssnText = r.rows[0].ssn;
    const cardText = r.rows[0].card;
    assert.equal(typeof ssnText, 'string');
    assert.ok(Buffer.isBuffer(r.rows[0].ssn_bin));
    // The binary form is the raw value: the base64 behind the text form.
    assert.deepEqual(r.rows[0].ssn_bin, rawOf(ssnText));
    assert.deepEqual(r.rows[0].card_bin, rawOf(cardText));
    assertHidden(ssnText, SSN);
    assertHidden(cardText, CARD);

    // Write them back unchanged into row b.
    const ssnOut = binary ? r.rows[0].ssn_bin : ssnText;
    const cardOut = binary ? r.rows[0].card_bin : cardText;
    await client.query(`UPDATE ${TABLE} SET ssn = $1, card = $2 WHERE id = $3`, [ssnOut, cardOut, b]);
    const copied = (await client.query(
      `SELECT ssn::text AS ssn, card::text AS card FROM ${TABLE} WHERE id = $1`, [b])).rows[0];
    assert.deepEqual(copied, { ssn: ssnText, card: cardText }, 'copies are byte-identical');

    // No context on ssn: the copy decrypts in its new row.
    const ok = await client.query(`SELECT ssn FROM ${VIEW} WHERE id = $1`, [b]);
    assert.equal(ok.rows[0].ssn, SSN);
    // card is bound to its row: the copy does not decrypt there.
    await assert.rejects(client.query(`SELECT card FROM ${VIEW} WHERE id = $1`, [b]), (err) => {
      assert.equal(err.code, 'XX001');
      assert.ok(!String(err.message).includes(CARD));
      return true;
    });
    // In its own row it still does.
    assert.equal((await client.query(`SELECT card FROM ${VIEW} WHERE id = $1`, [a])).rows[0].card, CARD);

    if (binary) {
      // A Buffer that is not a valid value is refused by the receive function.
      const bad = Buffer.from(r.rows[0].ssn_bin);
      bad[0] = 99;
      await assert.rejects(client.query(`UPDATE ${TABLE} SET ssn = $1 WHERE id = $2`, [bad, b]),
        (err) => err.code === '22P03');
    }

    // Row b does not decrypt, so it cannot be deleted through the view: the table.
    await client.query(`DELETE FROM ${VIEW} WHERE id = $1`, [a]);
    await client.query(`DELETE FROM ${TABLE} WHERE id = $1`, [b]);
  });
}

test('multi-row insert through the view in one statement', async () => {
  const names = ['x1', 'x2', 'x3'];
  const r = await client.query(
    `INSERT INTO ${VIEW} (name, ssn) SELECT n, 'bulk ' || n FROM unnest($1::text[]) n RETURNING id, ssn`, [names]);
  assert.deepEqual(r.rows.map((x) => x.ssn), names.map((n) => `bulk ${n}`));
  const ids = r.rows.map((x) => x.id);
  const stored = await client.query(`SELECT ssn::text AS t FROM ${TABLE} WHERE id = ANY($1)`, [ids]);
  for (const row of stored.rows) {
    assertHidden(row.t, 'bulk x1', 'bulk x2', 'bulk x3');
  }
  await client.query(`DELETE FROM ${VIEW} WHERE id = ANY($1)`, [ids]);
});
