/*
 * JDBC (pgjdbc) against envelope: a clear view and raw enc_bytea values, with
 * the driver's binary transfer off and on.
 *
 * Needs the dev environment (eval "$(test/devenv up)"): PGHOST is not used
 * (pgjdbc speaks TCP), the server is reached on localhost:$PGPORT, database
 * $PGDATABASE, user $PGUSER.  Makes and drops the table clients_java.
 *
 * Modes:
 *   text    binaryTransfer=false
 *   binary  binaryTransfer=true, prepareThreshold=-1 (binary from the first
 *           execution) and binaryTransferEnable=<enc_bytea's OID>, so the
 *           driver also receives and sends enc_bytea in binary (the type's
 *           send/recv functions: the raw value)
 *
 * In each: insert through the view (RETURNING the serial id and a default),
 * read plaintext back, fetch raw values and write them back unchanged into
 * another row (as an enc_bytea PGobject, and as a string cast to enc_bytea),
 * check the copy decrypts there unless the column binds a row context, check
 * no plaintext is stored, update and delete through the view.
 *
 * Build and run (test/clients/run does this):
 *   javac -cp /usr/share/java/postgresql.jar -d OUT ClientsJdbc.java
 *   java -cp OUT:/usr/share/java/postgresql.jar ClientsJdbc
 */
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Arrays;
import java.util.Base64;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.util.PGBinaryObject;
import org.postgresql.util.PGobject;

public class ClientsJdbc {
	static final String TABLE = "clients_java";
	static final String VIEW = "clients_java_clear";
	static final String CARD = "4111-1111-1111-1111 jdbc card";
	static final byte[] BLOB = "\u0000\u0001jdbc blob\u00ff".getBytes(StandardCharsets.ISO_8859_1);

	static int passed = 0;
	static int failed = 0;

	/** An enc_bytea value as the driver sees it, in text ("enc:" + base64) or binary (raw bytes) form. */
	public static class EncBytea extends PGobject implements PGBinaryObject {
		private static final long serialVersionUID = 1L;
		private byte[] raw;
		boolean receivedBinary = false;

		public EncBytea() {
			setType("enc_bytea");
		}

		@Override
		public void setValue(String v) throws SQLException {
			super.setValue(v);
			raw = v == null ? null : Base64.getDecoder().decode(v.substring(4));
		}

		@Override
		public void setByteValue(byte[] bytes, int offset) {
			raw = Arrays.copyOfRange(bytes, offset, bytes.length);
			value = "enc:" + Base64.getEncoder().encodeToString(raw);
			receivedBinary = true;
		}

		@Override
		public int lengthInBytes() {
			return raw.length;
		}

		@Override
		public void toBytes(byte[] bytes, int offset) {
			System.arraycopy(raw, 0, bytes, offset, raw.length);
		}

		byte[] raw() {
			return raw;
		}

		/** A copy whose text form is unusable: it can only be sent in binary. */
		EncBytea binaryOnly() {
			EncBytea e = new EncBytea();
			e.raw = raw.clone();
			e.value = "not a text form";
			return e;
		}
	}

	static void check(boolean ok, String what) {
		if (ok) {
			passed++;
			System.out.println("ok - " + what);
		} else {
			failed++;
			System.out.println("FAILED - " + what);
		}
	}

	static String env(String name, String dflt) {
		String v = System.getenv(name);
		return v == null || v.isEmpty() ? dflt : v;
	}

	static Connection connect(Properties extra) throws SQLException {
		String url = "jdbc:postgresql://localhost:" + env("PGPORT", "5432") + "/" + env("PGDATABASE", "envelope_dev");
		Properties p = new Properties();
		p.setProperty("user", env("PGUSER", "postgres"));
		p.setProperty("ApplicationName", "envelope clients test (jdbc)");
		p.putAll(extra);
		Connection c = DriverManager.getConnection(url, p);
		c.unwrap(PGConnection.class).addDataType("enc_bytea", EncBytea.class);
		return c;
	}

	static void exec(Connection c, String sql) throws SQLException {
		try (Statement s = c.createStatement()) {
			s.execute(sql);
		}
	}

	static boolean contains(byte[] hay, byte[] needle) {
		outer:
		for (int i = 0; i + needle.length <= hay.length; i++) {
			for (int j = 0; j < needle.length; j++) {
				if (hay[i + j] != needle[j]) {
					continue outer;
				}
			}
			return true;
		}
		return false;
	}

	/** The stored value holds none of the secrets, in its text form or its bytes. */
	static void checkHidden(String mode, String what, String valueText, byte[] raw, Object... secrets) {
		boolean ok = valueText != null && valueText.startsWith("enc:") && raw != null
			&& Arrays.equals(raw, Base64.getDecoder().decode(valueText.substring(4)));
		for (Object s : secrets) {
			byte[] b = s instanceof String ? ((String) s).getBytes(StandardCharsets.UTF_8) : (byte[]) s;
			if (contains(raw, b) || (s instanceof String && valueText.contains((String) s))) {
				ok = false;
			}
		}
		check(ok, mode + ": no plaintext in the stored " + what);
	}

	static void setup(Connection c) throws SQLException {
		exec(c, "DO $$ BEGIN IF to_regclass('" + VIEW + "') IS NOT NULL THEN "
			+ "PERFORM envelope.drop_clear_view('" + VIEW + "'); END IF; END $$");
		exec(c, "DROP TABLE IF EXISTS " + TABLE);
		exec(c, "CREATE TABLE " + TABLE + " (id serial PRIMARY KEY, name text NOT NULL, ssn enc_bytea, "
			+ "card enc_bytea, blob enc_bytea, created_at timestamptz NOT NULL DEFAULT now())");
		exec(c, "SELECT envelope.set_clear_column('" + TABLE + "', 'card', 'text', "
			+ "$$convert_to('" + TABLE + ":' || id, 'UTF8')$$)");
		exec(c, "SELECT envelope.set_clear_column('" + TABLE + "', 'blob', 'bytea')");
		exec(c, "SELECT envelope.create_clear_view('" + TABLE + "')");
	}

	static void teardown(Connection c) throws SQLException {
		exec(c, "SELECT envelope.drop_clear_view('" + VIEW + "')");
		exec(c, "DROP TABLE " + TABLE);
	}

	static int insert(Connection c, String name, String ssn, String card, byte[] blob) throws SQLException {
		try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + VIEW
				+ " (name, ssn, card, blob) VALUES (?, ?, ?, ?) RETURNING id, created_at")) {
			ps.setString(1, name);
			ps.setString(2, ssn);
			ps.setString(3, card);
			ps.setBytes(4, blob);
			try (ResultSet rs = ps.executeQuery()) {
				rs.next();
				if (rs.getTimestamp(2) == null) {
					throw new SQLException("created_at default did not come back through RETURNING");
				}
				return rs.getInt(1);
			}
		}
	}

	static void run(String mode, Properties props) throws SQLException {
		String ssn = "123-45-6789 jdbc " + mode;
		try (Connection c = connect(props)) {
			// Insert through the view; RETURNING brings the serial id and the default back.
			int a = insert(c, "a-" + mode, ssn, CARD, BLOB);
			int b = insert(c, "b-" + mode, "other ssn", "other card", null);
			check(a > 0 && b > a, mode + ": INSERT ... RETURNING id through the view");

			// Plaintext back through the view.
			try (PreparedStatement ps = c.prepareStatement("SELECT name, ssn, card, blob FROM " + VIEW + " WHERE id = ?")) {
				for (int i = 0; i < 2; i++) {       // twice: the second execution is server-prepared in text mode too
					ps.setInt(1, a);
					try (ResultSet rs = ps.executeQuery()) {
						rs.next();
						check(("a-" + mode).equals(rs.getString(1)) && ssn.equals(rs.getString(2))
							&& CARD.equals(rs.getString(3)) && Arrays.equals(BLOB, rs.getBytes(4)),
							mode + ": plaintext read back through the view (execution " + (i + 1) + ")");
					}
				}
			}

			// The raw values, as enc_bytea objects, and their text form from the server.
			EncBytea ssnRaw;
			EncBytea cardRaw;
			EncBytea blobRaw;
			try (PreparedStatement ps = c.prepareStatement("SELECT ssn, card, blob, ssn::text, card::text, blob::text, "
					+ "envelope.kek_of(ssn) FROM " + TABLE + " WHERE id = ?")) {
				ps.setInt(1, a);
				try (ResultSet rs = ps.executeQuery()) {
					rs.next();
					ssnRaw = (EncBytea) rs.getObject(1);
					cardRaw = (EncBytea) rs.getObject(2);
					blobRaw = (EncBytea) rs.getObject(3);
					check(ssnRaw.getValue().equals(rs.getString(4)) && cardRaw.getValue().equals(rs.getString(5))
						&& blobRaw.getValue().equals(rs.getString(6)),
						mode + ": raw values as the driver sees them equal their server text form");
					check("pii".equals(rs.getString(7)), mode + ": stored under the default KEK");
				}
			}
			boolean wantBinary = "binary".equals(mode);
			check(ssnRaw.receivedBinary == wantBinary,
				mode + ": enc_bytea received in " + (wantBinary ? "binary" : "text") + " format");
			checkHidden(mode, "ssn", ssnRaw.getValue(), ssnRaw.raw(), ssn);
			checkHidden(mode, "card", cardRaw.getValue(), cardRaw.raw(), CARD);
			checkHidden(mode, "blob", blobRaw.getValue(), blobRaw.raw(), BLOB);

			// Write the raw values back unchanged into row b (binary mode: sent in binary).
			try (PreparedStatement ps = c.prepareStatement("UPDATE " + TABLE + " SET ssn = ?, card = ? WHERE id = ?")) {
				ps.setObject(1, ssnRaw);
				ps.setObject(2, cardRaw);
				ps.setInt(3, b);
				check(ps.executeUpdate() == 1, mode + ": raw values written back as enc_bytea objects");
			}
			try (PreparedStatement ps = c.prepareStatement("SELECT ssn::text = (SELECT ssn::text FROM " + TABLE
					+ " WHERE id = ?), card::text = (SELECT card::text FROM " + TABLE + " WHERE id = ?) FROM "
					+ TABLE + " WHERE id = ?")) {
				ps.setInt(1, a);
				ps.setInt(2, a);
				ps.setInt(3, b);
				try (ResultSet rs = ps.executeQuery()) {
					rs.next();
					check(rs.getBoolean(1) && rs.getBoolean(2), mode + ": copies are byte-identical");
				}
			}
			try (PreparedStatement ps = c.prepareStatement("SELECT ssn FROM " + VIEW + " WHERE id = ?")) {
				ps.setInt(1, b);
				try (ResultSet rs = ps.executeQuery()) {
					rs.next();
					check(ssn.equals(rs.getString(1)), mode + ": a copied value without context decrypts in its new row");
				}
			}
			try (PreparedStatement ps = c.prepareStatement("SELECT card FROM " + VIEW + " WHERE id = ?")) {
				ps.setInt(1, b);
				try (ResultSet rs = ps.executeQuery()) {
					rs.next();
					check(false, mode + ": a copied context-bound value must not decrypt in another row");
				} catch (SQLException e) {
					check("XX001".equals(e.getSQLState()) && !e.getMessage().contains(CARD),
						mode + ": a copied context-bound value fails with XX001 in another row (got "
							+ e.getSQLState() + ")");
				}
			}
			if (wantBinary) {
				// Proof that the driver sent the value in binary (enc_bytea_recv).
				try (PreparedStatement ps = c.prepareStatement("UPDATE " + TABLE + " SET ssn = ? WHERE id = ? "
						+ "RETURNING ssn::text")) {
					ps.setObject(1, ssnRaw.binaryOnly());
					ps.setInt(2, b);
					try (ResultSet rs = ps.executeQuery()) {
						rs.next();
						check(ssnRaw.getValue().equals(rs.getString(1)), mode + ": enc_bytea sent in binary format");
					}
				}
			}
			// The string form, cast on the server, works the same way.
			try (PreparedStatement ps = c.prepareStatement("UPDATE " + TABLE + " SET card = CAST(? AS enc_bytea), "
					+ "blob = CAST(? AS enc_bytea) WHERE id = ?")) {
				ps.setString(1, cardRaw.getValue());
				ps.setString(2, blobRaw.getValue());
				ps.setInt(3, a);
				check(ps.executeUpdate() == 1, mode + ": raw values written back as strings cast to enc_bytea");
			}
			try (PreparedStatement ps = c.prepareStatement("SELECT card, blob FROM " + VIEW + " WHERE id = ?")) {
				ps.setInt(1, a);
				try (ResultSet rs = ps.executeQuery()) {
					rs.next();
					check(CARD.equals(rs.getString(1)) && Arrays.equals(BLOB, rs.getBytes(2)),
						mode + ": values written back into their own row still decrypt");
				}
			}

			// Update one column through the view: the others keep their ciphertext.
			try (PreparedStatement ps = c.prepareStatement("UPDATE " + VIEW + " SET ssn = ? WHERE id = ? RETURNING ssn, card")) {
				ps.setString(1, "changed " + mode);
				ps.setInt(2, a);
				try (ResultSet rs = ps.executeQuery()) {
					rs.next();
					check(("changed " + mode).equals(rs.getString(1)) && CARD.equals(rs.getString(2)),
						mode + ": UPDATE ... RETURNING through the view");
				}
			}
			try (PreparedStatement ps = c.prepareStatement("SELECT ssn::text <> ?, card::text = ? FROM " + TABLE + " WHERE id = ?")) {
				ps.setString(1, ssnRaw.getValue());
				ps.setString(2, cardRaw.getValue());
				ps.setInt(3, a);
				try (ResultSet rs = ps.executeQuery()) {
					rs.next();
					check(rs.getBoolean(1) && rs.getBoolean(2), mode + ": only the changed column was encrypted again");
				}
			}
			// Delete through the view.  Row b holds a value that does not
			// decrypt in it, and the view must decrypt a row to delete it
			// through the trigger: it goes through the table.
			try (PreparedStatement ps = c.prepareStatement("DELETE FROM " + VIEW + " WHERE id = ? RETURNING ssn")) {
				ps.setInt(1, a);
				try (ResultSet rs = ps.executeQuery()) {
					check(rs.next() && ("changed " + mode).equals(rs.getString(1)) && !rs.next(),
						mode + ": DELETE ... RETURNING through the view");
				}
			}
			try (PreparedStatement ps = c.prepareStatement("DELETE FROM " + TABLE + " WHERE id = ?")) {
				ps.setInt(1, b);
				check(ps.executeUpdate() == 1, mode + ": DELETE of a row that does not decrypt, from the table");
			}
		}
	}

	public static void main(String[] args) throws Exception {
		long encOid;
		try (Connection c = connect(new Properties())) {
			setup(c);
			try (Statement s = c.createStatement();
				 ResultSet rs = s.executeQuery("SELECT 'enc_bytea'::regtype::oid")) {
				rs.next();
				encOid = rs.getLong(1);
			}
		}
		Properties text = new Properties();
		text.setProperty("binaryTransfer", "false");
		Properties binary = new Properties();
		binary.setProperty("binaryTransfer", "true");
		binary.setProperty("prepareThreshold", "-1");
		binary.setProperty("binaryTransferEnable", Long.toString(encOid));
		try {
			run("text", text);
			run("binary", binary);
		} catch (Exception e) {
			e.printStackTrace(System.out);
			failed++;
		} finally {
			try (Connection c = connect(new Properties())) {
				teardown(c);
			}
		}
		System.out.println("jdbc: " + passed + " passed, " + failed + " failed");
		System.exit(failed == 0 ? 0 : 1);
	}
}
