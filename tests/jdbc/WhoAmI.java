// Logs in through pgproxy with PgJDBC and prints who the database thinks we are.
// Usage: java -cp .:postgresql.jar WhoAmI JDBC_URL USER   (the password comes from $PGPASSWORD)
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.Properties;

public class WhoAmI {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", System.getenv("PGPASSWORD"));
        try (Connection conn = DriverManager.getConnection(args[0], props);
             ResultSet rs = conn.createStatement().executeQuery(
                 "SELECT current_user, current_setting('pgproxy.user'), current_setting('pgproxy.auth_method')")) {
            rs.next();
            System.out.println(rs.getString(1) + "|" + rs.getString(2) + "|" + rs.getString(3));
        } catch (SQLException e) {
            System.out.println("ERROR|" + e.getSQLState() + "|" + e.getMessage());
            System.exit(3);
        }
    }
}
