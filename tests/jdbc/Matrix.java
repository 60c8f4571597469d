// PgJDBC through pgproxy with default settings: a PreparedStatement past the prepare
// threshold (server-side named statements from the 5th run), a batch insert, autocommit
// off with a commit, and a fetchSize cursor. Prints one "check|value" line per result.
// Usage: java -cp .:postgresql.jar Matrix JDBC_URL USER ID_BASE   (password from $PGPASSWORD)
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.Properties;

public class Matrix {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", System.getenv("PGPASSWORD"));
        int base = Integer.parseInt(args[2]);
        try (Connection conn = DriverManager.getConnection(args[0], props)) {
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT current_user, current_setting('pgproxy.user'), ?::int")) {
                for (int i = 0; i < 12; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        System.out.println("prepared|" + rs.getString(1) + "|" + rs.getString(2) + "|" + rs.getInt(3));
                    }
                }
            }
            conn.setAutoCommit(false);
            try (PreparedStatement ins = conn.prepareStatement("INSERT INTO items (id, name) VALUES (?, ?)")) {
                for (int i = 0; i < 50; i++) {
                    ins.setInt(1, base + i);
                    ins.setString(2, "jdbc-" + i);
                    ins.addBatch();
                }
                int[] counts = ins.executeBatch();
                System.out.println("batch|" + counts.length);
            }
            conn.commit();
            try (PreparedStatement sel = conn.prepareStatement(
                    "SELECT id FROM items WHERE id >= ? AND id < ? ORDER BY id")) {
                sel.setFetchSize(7);
                sel.setInt(1, base);
                sel.setInt(2, base + 50);
                long sum = 0;
                int rows = 0;
                try (ResultSet rs = sel.executeQuery()) {
                    while (rs.next()) {
                        sum += rs.getInt(1) - base;
                        rows++;
                    }
                }
                System.out.println("cursor|" + rows + "|" + sum);
            }
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("DELETE FROM items WHERE id >= " + base + " AND id < " + (base + 50));
            }
            conn.commit();
            conn.setAutoCommit(true);
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT current_user, current_setting('pgproxy.user')")) {
                rs.next();
                System.out.println("end|" + rs.getString(1) + "|" + rs.getString(2));
            }
        }
    }
}
