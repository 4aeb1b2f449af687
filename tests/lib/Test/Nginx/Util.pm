package Test::Nginx::Util;

# ---------------------------------------------------------------------------
# Test::Nginx::Util - engine of pdgate's compatible subset of OpenResty's
# Test::Nginx::Socket (data-driven nginx tests, version 0.33 block format).
#
# This is an independent implementation written from the documented format
# (the POD of Test::Nginx::Socket 0.33); it shares no code with the original.
# The goal is that a .t file written for the real Test::Nginx::Socket runs
# unchanged here *and* there, with the same number of subtests, the same
# subtest names and the same pass/fail outcome.  Only the commonly used part
# of the format is implemented (see the POD at the end of
# Test/Nginx/Socket.pm for the list and for the known differences); blocks
# using a section this subset cannot honour are refused with a bail out
# rather than silently mis-tested.
#
# Deliberate deviation: the generated server listens on 127.0.0.1 only (the
# original listens on all interfaces).
#
# Dependencies (Debian bookworm): libtest-base-perl, libtest-longstring-perl,
# libhttp-message-perl, liblist-moreutils-perl (optional), core Perl.
# ---------------------------------------------------------------------------

use strict;
use warnings;

our $VERSION = '0.33';

use base 'Exporter';

use Carp qw(croak);
use Cwd ();
use Encode ();
use Errno qw(EAGAIN EINTR EWOULDBLOCK);
use File::Path qw(make_path remove_tree);
use File::Find ();
use File::Spec ();
use File::Temp ();
use HTTP::Response ();
use IO::Handle ();
use IO::Select ();
use IO::Socket::INET ();
use JSON::PP ();
use List::Util qw(shuffle min);
use POSIX qw(SIGQUIT SIGKILL SIGTERM SIGHUP SIGUSR1 WNOHANG);
use Scalar::Util qw(looks_like_number);
use Test::Builder ();
use Test::LongString ();
use Test::More ();
use Time::HiRes qw(sleep);

# ---------------------------------------------------------------------------
# Settings (same names and defaults as the documented ones)
# ---------------------------------------------------------------------------

our $RepeatEach          = 1;
our $NoShuffle           = $ENV{TEST_NGINX_NO_SHUFFLE} || 0;
our $Timeout             = $ENV{TEST_NGINX_TIMEOUT} || 3;
our $CheckAccumErrLog    = $ENV{TEST_NGINX_CHECK_ACCUM_ERR_LOG};
our $ServerAddr          = '127.0.0.1';
our $ServerName          = 'localhost';
our $WorkerUser          = $ENV{TEST_NGINX_WORKER_USER};
our $Randomize           = $ENV{TEST_NGINX_RANDOMIZE};
our $NginxBinary         = $ENV{TEST_NGINX_BINARY} || 'nginx';
our $Workers             = 1;
our $WorkerConnections   = 64;
our $LogLevel            = $ENV{TEST_NGINX_LOG_LEVEL} || 'debug';
our $MasterProcessEnabled = $ENV{TEST_NGINX_MASTER_PROCESS} || 'off';
our $DaemonEnabled       = 'on';
our $ServerPort          = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
our $ServerPortForClient = $ENV{TEST_NGINX_CLIENT_PORT} || $ServerPort;
our $NoRootLocation      = 0;
our $TestNginxSleep      = $ENV{TEST_NGINX_SLEEP} || 0.015;
our $ForceRestartOnTest  = defined $ENV{TEST_NGINX_FORCE_RESTART_ON_TEST}
                           ? $ENV{TEST_NGINX_FORCE_RESTART_ON_TEST} : 1;
our $UseHup              = $ENV{TEST_NGINX_USE_HUP};
our $NoNginxManager      = $ENV{TEST_NGINX_NO_NGINX_MANAGER} || 0;
our $LoadModules         = $ENV{TEST_NGINX_LOAD_MODULES};
our $PostponeOutput      = $ENV{TEST_NGINX_POSTPONE_OUTPUT};
our $EventType           = $ENV{TEST_NGINX_EVENT_TYPE};
our $Verbose             = $ENV{TEST_NGINX_VERBOSE};
our $NoLongString;
our $ConfigPreamble      = '';
our $FilterHttpConfig;

# Modes of the original that this subset does not implement.  They are
# reported once and otherwise ignored (they do not change what a .t file
# means, only how nginx is run or observed).
our $CheckLeak = 0;
our $Benchmark = 0;
our $BenchmarkWarmup = 0;
our $UseStap;

if (defined $WorkerUser && $WorkerUser !~ /^\w[-\w]+(?:\s+\w[-\w]+)?$/) {
    die "Bad value in the env TEST_NGINX_WORKER_USER: $WorkerUser\n";
}

# Results of "nginx -V", filled in by run_tests().
our ($NginxVersion, $NginxRawVersion, $OpenSSLVersion, $PcreVersion);
our $NginxV = '';

our @EnvToNginx;
our @BlockPreprocessors;
our @CleanupHandlers;
our @TestCleanupHandlers;
our @ResponseBodyChecks;

# Hooks kept for compatibility with code that peeks at the original's
# variables (set further below).
our ($RunTestHelper, $CheckErrorLog, $CheckShutdownErrorLog);

our $RandPorts = {};     # TEST_NGINX_RAND_PORT_N values of the current block
our $ConfigVersion;      # HUP mode: marker served on /ver
our $PrevConfig;         # --- config of the last block that (re)configured nginx
our $PrevBlock;          # last block run (for --- shutdown_error_log)
our $ErrLogFilePos = 0;  # error.log offset already examined in this block
our $FirstTime = 1;
our $ChildPid;           # never set here; kept for the original's API
our $InSubprocess;

# State of the block being run.
our $DryRun;             # reason every subtest is skipped, or false
our $StartError;         # why nginx could not be started, or undef
our $CurrentName;        # name of the block being run
my @ExtraErrLogLines;    # must_die: nginx stderr, checked with error.log
my $TotalConnectFailures = 0;

sub gen_rand_port (;$$);

# The port is chosen before the server root, which may depend on it.
if ($Randomize) {
    $ServerPort = gen_rand_port(1000)
        or die "Cannot find an available listening port number.\n";
    $ServerPortForClient = $ServerPort;
}

our $ServRoot = $Randomize
    ? File::Spec->rel2abs("t/servroot_$ServerPort")
    : ($ENV{TEST_NGINX_SERVROOT} || File::Spec->rel2abs('t/servroot'));
$ENV{TEST_NGINX_SERVER_ROOT} = $ServRoot;

our $LogDir     = File::Spec->catfile($ServRoot, 'logs');
our $ErrLogFile = File::Spec->catfile($LogDir, 'error.log');
our $AccLogFile = File::Spec->catfile($LogDir, 'access.log');
our $HtmlDir    = File::Spec->catfile($ServRoot, 'html');
our $ConfDir    = File::Spec->catfile($ServRoot, 'conf');
our $ConfFile   = File::Spec->catfile($ConfDir, 'nginx.conf');
our $PidFile    = File::Spec->catfile($LogDir, 'nginx.pid');
our $CacheDir   = File::Spec->catfile($ServRoot, 'cache');

our @EXPORT = qw(
    expand_env_in_text env_to_nginx is_str check_accum_error_log is_running
    $NoLongString no_long_string $ServerAddr server_addr $ServerName
    server_name parse_time verbose sleep_time bail_out add_cleanup_handler
    add_test_cleanup_handler access_log_data error_log_data
    setup_server_root write_config_file get_canon_version get_nginx_version
    trim show_all_chars parse_headers run_tests run_test get_pid_from_pidfile
    $ServerPortForClient $ServerPort $NginxVersion $PcreVersion $PidFile
    $ServRoot $ConfFile $RunTestHelper $CheckErrorLog $CheckShutdownErrorLog
    $FilterHttpConfig $NoNginxManager $RepeatEach $CheckLeak $Benchmark
    $BenchmarkWarmup $UseStap
    add_block_preprocessor timeout worker_connections workers master_on
    master_off config_preamble repeat_each master_process_enabled log_level
    no_shuffle no_root_location html_dir server_root server_port
    server_port_for_client no_nginx_manager use_hup
    add_response_body_check set_http_config_filter
);

# ---------------------------------------------------------------------------
# Exported configuration functions
# ---------------------------------------------------------------------------

sub repeat_each (@) { $RepeatEach = shift if @_; return $RepeatEach }
sub workers (@) { if (@_) { $Workers = shift } else { return $Workers } }
sub worker_connections (@) {
    if (@_) { $WorkerConnections = shift } else { return $WorkerConnections }
}
sub log_level (@) { if (@_) { $LogLevel = shift } else { return $LogLevel } }
sub timeout (@) { if (@_) { $Timeout = shift } else { return $Timeout } }
sub master_on () { $MasterProcessEnabled = 'on' }
sub master_off () { $MasterProcessEnabled = 'off' }
sub master_process_enabled (@) {
    if (@_) { $MasterProcessEnabled = shift() ? 'on' : 'off' }
    else { return $MasterProcessEnabled }
}
sub no_shuffle () { $NoShuffle = 1 }
sub no_root_location () { $NoRootLocation = 1 }
sub no_long_string () { $NoLongString = 1 }
sub no_nginx_manager () { $NoNginxManager = 1 }
sub use_hup () { $UseHup = 1 }
sub check_accum_error_log () { $CheckAccumErrLog = 1 }
sub config_preamble ($) { $ConfigPreamble = shift }
sub set_http_config_filter ($) { $FilterHttpConfig = shift }
sub server_addr (@) { if (@_) { $ServerAddr = shift } else { return $ServerAddr } }
sub server_name (@) { if (@_) { $ServerName = shift } else { return $ServerName } }
sub server_port (@) { if (@_) { $ServerPort = shift } else { return $ServerPort } }
sub server_port_for_client (@) {
    if (@_) { $ServerPortForClient = shift } else { return $ServerPortForClient }
}
sub html_dir () { return $HtmlDir }
sub server_root () { return $ServRoot }
sub sleep_time () { return $TestNginxSleep }
sub verbose () { return $Verbose }

sub env_to_nginx (@) {
    croak "env_to_nginx: no arguments specified" unless @_;
    for my $v (@_) {
        croak "env_to_nginx: bad argument value: $v\n"
            if $v !~ /^[A-Za-z_]/ || $v =~ /\n/;
        push @EnvToNginx, $v;
    }
}

# The preprocessor registered last runs first (as documented upstream).
sub add_block_preprocessor (&) { unshift @BlockPreprocessors, shift }
sub add_cleanup_handler ($) { unshift @CleanupHandlers, shift }
sub add_test_cleanup_handler ($) { unshift @TestCleanupHandlers, shift }
sub add_response_body_check ($) { push @ResponseBodyChecks, shift }

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

sub bail_out (@) {
    cleanup();
    Test::More::BAIL_OUT(join '', @_);
}

# "1.5", "1.5s" or "200ms" -> seconds.
sub parse_time ($) {
    my $tm = shift;
    return $tm unless defined $tm;
    if ($tm =~ s/([^_a-zA-Z])ms$/$1/) {
        $tm = $tm / 1000;
    } else {
        $tm =~ s/([^_a-zA-Z])s$/$1/;
    }
    return $tm;
}

sub trim ($) {
    my $s = shift;
    return undef unless defined $s;
    $s =~ s/^\s+|\s+$//g;
    $s =~ s/\n/ /g;
    $s =~ s/\s{2,}/ /g;
    return $s;
}

sub show_all_chars ($) {
    my $s = shift;
    $s =~ s/\n/\\n/g;
    $s =~ s/\r/\\r/g;
    $s =~ s/\t/\\t/g;
    return $s;
}

# One-line rendering of a log line or pattern for test names.
sub fmt_str ($) {
    my $s = shift;
    chomp $s;
    $s =~ s/"/\\"/g;
    $s =~ s/\r/\\r/g;
    $s =~ s/\n/\\n/g;
    return $s;
}

# String comparison honouring no_long_string() and Regexp expectations.
sub is_str (@) {
    my ($got, $expected, $desc) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    if (ref $expected && ref $expected eq 'Regexp') {
        return Test::More::like($got, $expected, $desc);
    }
    return Test::More::is($got, $expected, $desc) if $NoLongString;
    return Test::LongString::is_string($got, $expected, $desc);
}

sub get_canon_version (@) { sprintf "%d.%03d%03d", $_[0], $_[1], $_[2] }

sub get_canon_openssl_version (@) {
    return sprintf "%d.%03d%03d%03d", @_[0 .. 2], ord($_[3]) - ord('a')
        if defined $_[3];
    return get_canon_version(@_);
}

# Numeric comparison used by the skip_* sections ($op is <, <=, > or >=).
sub version_cmp ($$$) {
    my ($a, $op, $b) = @_;
    return $a < $b  if $op eq '<';
    return $a <= $b if $op eq '<=';
    return $a > $b  if $op eq '>';
    return $a >= $b if $op eq '>=';
    return 0;
}

sub nginx_command () {
    # TEST_NGINX_BINARY may carry a wrapper ("valgrind -q nginx").
    return split ' ', $NginxBinary;
}

sub can_run ($) {
    my $cmd = shift;
    if ($cmd =~ m{/}) {
        return (-f $cmd && -x _) ? $cmd : undef;
    }
    for my $dir (split(/:/, $ENV{PATH} // ''), '.') {
        next if $dir eq '';
        my $abs = File::Spec->catfile($dir, $cmd);
        return $abs if -f $abs && -x _;
    }
    return undef;
}

# Parses "nginx -V" once; bails out when the binary cannot be run.
sub get_nginx_version () {
    my ($prog) = nginx_command();
    if (!defined $prog || !can_run($prog)) {
        bail_out("Cannot find the nginx executable \"$NginxBinary\" "
                 . "(set TEST_NGINX_BINARY or PATH)");
    }
    my $cmd = join ' ', map { quotemeta } nginx_command();
    my $out = `$cmd -V 2>&1`;
    if (!defined $out || $? != 0) {
        bail_out("Failed to get the version of the Nginx in PATH: "
                 . ($out // ''));
    }
    $NginxV = $out;
    if ($out =~ m{built with OpenSSL (\d+)\.(\d+)\.(\d+)([a-z])?}s) {
        $OpenSSLVersion = get_canon_openssl_version($1, $2, $3, $4);
    }
    my $ver;
    if ($out =~ m{(?:nginx|openresty)[^/]*/(\d+)\.(\d+)\.(\d+)}s
        || $out =~ m{\w+/(\d+)\.(\d+)\.(\d+)}s)
    {
        $NginxRawVersion = "$1.$2.$3";
        $ver = get_canon_version($1, $2, $3);
    } else {
        bail_out("Failed to parse the output of \"nginx -V\": $out\n");
    }
    if ($out =~ m{nginx version: .*/(\d)\.(\d+)(?:\.\d+)+}) {
        my $v = $1 * 100 + $2;
        $PcreVersion = ($v >= 125 && $out !~ /--without-pcre2/) ? 2
                     : $out =~ /pcre/ ? 1 : 0;
    }
    return $ver;
}

# Picks a random unprivileged TCP port that can currently be bound on the
# server address.  $used is a hash of ports not to hand out again.
sub gen_rand_port (;$$) {
    my ($tries, $used) = @_;
    $tries //= 1000;
    $used //= {};
    for (1 .. $tries) {
        my $port = int(rand 63547) + 1988;
        next if $used->{$port};
        my $sock = IO::Socket::INET->new(
            LocalAddr => $ServerAddr,
            LocalPort => $port,
            Proto     => 'tcp',
            Listen    => 5,
            Reuse     => 1,
        );
        if ($sock) {
            close $sock;
            return $port;
        }
    }
    return undef;
}

# Replaces every $TEST_NGINX_XXX in $text.  TEST_NGINX_RAND_PORT_N gets a
# free port, distinct within the block; other names come from %ENV, with a
# few built-in fallbacks.  An unknown name aborts the run, like upstream.
sub expand_env_in_text ($$$) {
    my ($text, $name, $rand_ports) = @_;
    return undef unless defined $text;
    $rand_ports //= $RandPorts;

    my %builtin = (
        TEST_NGINX_SERVER_PORT => $ServerPort,
        TEST_NGINX_SERVER_ROOT => $ServRoot,
        TEST_NGINX_SERVROOT    => $ServRoot,
        TEST_NGINX_HTML_DIR    => $HtmlDir,
    );

    $text =~ s{\$(TEST_NGINX_[_A-Z0-9]+)}{
        my $var = $1;
        my $val;
        if ($var =~ /^TEST_NGINX_RAND_PORT_[0-9]+$/) {
            if (!defined $rand_ports->{$var}) {
                my %used = ($ServerPort => 1, map { $_ => 1 } values %$rand_ports);
                my $port = gen_rand_port(1000, \%used);
                defined $port or bail_out(
                    "$name - Cannot find an available listening port number for $var.\n");
                $rand_ports->{$var} = $port;
            }
            $val = $rand_ports->{$var};
        } else {
            $val = $ENV{$var} // $builtin{$var};
            defined $val or bail_out("$name - No environment $var defined.\n");
        }
        $val;
    }ge;

    return $text;
}

# "Name: value" lines -> { Name => value }; "!Name" -> { Name => undef }.
sub parse_headers ($) {
    my $s = shift;
    my %headers;
    for my $line (split /\n/, $s // '') {
        $line =~ s/^\s+|\s+$//g;
        if ($line =~ s/^!\s*//) {
            $headers{$line} = undef;
        } else {
            my ($key, $val) = split /\s*:\s*/, $line, 2;
            $headers{$key // ''} = $val;
        }
    }
    return \%headers;
}

# ---------------------------------------------------------------------------
# nginx process management
# ---------------------------------------------------------------------------

# True when $pid names a live process.  A zombie counts as dead: nginx
# daemonizes, and where PID 1 does not reap orphans it lingers as a zombie.
sub is_running ($) {
    my $pid = shift;
    return 0 unless $pid && $pid =~ /^\d+$/ && kill(0, $pid);
    if (open my $in, '<', "/proc/$pid/stat") {
        my $stat = <$in> // '';
        close $in;
        return 0 if $stat =~ /^\d+ \(.*\) [ZX]/s;
    }
    return 1;
}

sub get_pid_from_pidfile ($) {
    my $name = shift;
    open my $in, '<', $PidFile
        or bail_out("$name - Failed to open the pid file $PidFile for reading: $!");
    my $pid = do { local $/; <$in> } // '';
    close $in;
    $pid =~ s/\s+//g;
    return $pid;
}

# The pid of the nginx managed by this file, or undef.
sub running_nginx_pid () {
    return undef unless -f $PidFile;
    open my $in, '<', $PidFile or return undef;
    my $pid = do { local $/; <$in> } // '';
    close $in;
    $pid =~ s/\s+//g;
    return is_running($pid) ? $pid : undef;
}

# Stops $pid: QUIT (or TERM with TEST_NGINX_FAST_SHUTDOWN), then TERM, then
# KILL if it will not go.
sub kill_process ($$$) {
    my ($pid, $wait, $name) = @_;
    return unless is_running($pid);

    if ($wait) {
        kill($ENV{TEST_NGINX_FAST_SHUTDOWN} ? SIGTERM : SIGQUIT, $pid);
        my $left = timeout();
        while ($left > 0 && is_running($pid)) {
            waitpid($pid, WNOHANG);
            sleep 0.02;
            $left -= 0.02;
        }
    }

    my $step = $TestNginxSleep;
    for (1 .. 20) {
        return unless is_running($pid);
        warn "WARNING: $name - killing the nginx process $pid.\n" if $Verbose;
        kill(SIGTERM, $pid);
        $step *= 1.2;
        $step = 0.5 if $step > 0.5;
        sleep $step;
        waitpid($pid, WNOHANG);
    }
    return unless is_running($pid);

    warn "$name - WARNING: killing the nginx process $pid with force...\n";
    kill(SIGKILL, $pid);
    waitpid($pid, WNOHANG);
    for (1 .. 100) {
        last unless is_running($pid);
        sleep 0.01;
    }
}

sub stop_nginx ($) {
    my $name = shift;
    my $pid = running_nginx_pid();
    kill_process($pid, 1, $name) if defined $pid;
    unlink $PidFile if -f $PidFile;
}

# Runs the nginx command line once; nginx daemonizes, so this returns when
# the server is up (status 0) or has failed.  Returns (status, stderr).
sub run_nginx ($$) {
    my ($block, $cmd) = @_;

    my ($err_fh, $err_file) = File::Temp::tempfile('pdgate-nginx-stderr-XXXXXX',
                                                   TMPDIR => 1, UNLINK => 1);
    # Nothing buffered may be inherited (and printed twice) by the child.
    $_->flush for grep { defined } \*STDOUT, \*STDERR,
        Test::More->builder->output, Test::More->builder->failure_output;
    my $pid = fork();
    bail_out("fork() failed: $!") unless defined $pid;

    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', '/dev/null';
        if (defined $block->suppress_stderr) {
            open STDERR, '>', '/dev/null';
        } else {
            open STDERR, '>&', $err_fh;
        }
        if (defined $ENV{TEST_NGINX_LD_PRELOAD}) {
            $ENV{LD_PRELOAD} = join ' ', grep { defined && length }
                $ENV{TEST_NGINX_LD_PRELOAD}, $ENV{LD_PRELOAD};
        }
        { no warnings "exec"; exec { $cmd->[0] } @$cmd; }
        print STDERR "cannot exec $cmd->[0]: $!\n";
        POSIX::_exit(127);
    }

    waitpid($pid, 0);
    my $status = $?;
    close $err_fh;
    my $stderr = '';
    if (open my $in, '<', $err_file) {
        local $/;
        $stderr = <$in> // '';
        close $in;
    }
    unlink $err_file;
    return ($status, $stderr);
}

sub nginx_cmd_line () {
    my @cmd = nginx_command();
    # "-e" (error log used while starting up) exists since nginx 1.19.5.
    if (defined $NginxVersion && $NginxVersion >= 1.019005) {
        push @cmd, '-e', $ErrLogFile;
    }
    push @cmd, '-p', "$ServRoot/", '-c', $ConfFile;
    return \@cmd;
}

sub tail_of_error_log ($) {
    my $n = shift;
    open my $in, '<', $ErrLogFile or return '';
    my @lines = <$in>;
    close $in;
    @lines = @lines[-$n .. -1] if @lines > $n;
    return join '', @lines;
}

# ---------------------------------------------------------------------------
# Server root and nginx.conf
# ---------------------------------------------------------------------------

sub setup_server_root ($) {
    my $first_time = shift;

    if (-d $ServRoot) {
        # Remove only what we create, so that a mis-set TEST_NGINX_SERVROOT
        # pointing at real data is refused rather than wiped.
        remove_tree($ConfDir, glob("$ServRoot/*_cache"), glob("$ServRoot/*_temp"));

        if ($UseHup) {
            # Keep the files the running master still needs.
            File::Find::find({ bydepth => 1, no_chdir => 1, wanted => sub {
                return if -d $_;
                return if !$first_time
                          && /(?:\bnginx\.pid|\.sock|\.crt|\.key)$/;
                unlink $_ or warn "Failed to remove $_: $!\n";
            } }, $ServRoot);
        } else {
            remove_tree($CacheDir, $HtmlDir, $LogDir);
            rmdir $ServRoot
                or bail_out("Can't remove $ServRoot (not empty?): $!");
        }
    }

    if (!-d $ServRoot) {
        make_path($ServRoot) or bail_out("Failed to create $ServRoot: $!\n");
    }
    for my $dir ($LogDir, $HtmlDir) {
        next if -d $dir;
        mkdir $dir or bail_out("Failed to do mkdir $dir: $!\n");
    }

    my $index = "$HtmlDir/index.html";
    open my $out, '>', $index or bail_out("Can't open $index for writing: $!\n");
    print $out '<html><head><title>It works!</title></head>'
             . '<body>It works!</body></html>';
    close $out;

    mkdir $ConfDir or bail_out("Failed to do mkdir $ConfDir: $!\n");
}

sub run_customer_init_script ($) {
    my $block = shift;
    my $code = $block->post_setup_server_root;
    return unless $code;
    eval $code;
    bail_out($block->name . " - post_setup_server_root failed: $@") if $@;
}

# --- user_files: ">>> name [mtime]" followed by the content, repeated; or an
# eval'ed array of [name, content, mtime].  Relative names go under html/.
sub write_user_files ($$) {
    my ($block, $rand_ports) = @_;
    my $name = $block->name;
    my $files = $block->user_files;
    return unless $files;

    if (!ref $files) {
        my @list;
        my $cur;
        for my $line (split /^/m, $files) {
            if ($line =~ />>> (\S+)(?:\s+(.+))?/) {
                push @list, $cur if $cur;
                $cur = [$1, undef, $2];
            } elsif ($cur) {
                $cur->[1] .= $line;
            }
        }
        push @list, $cur if $cur;
        $files = \@list;
    } elsif (ref $files ne 'ARRAY') {
        bail_out("$name - wrong value type: " . ref($files)
                 . ", only scalar or ARRAY are accepted");
    }

    for my $file (@$files) {
        my ($fname, $body, $date) = @$file;
        $body //= '';
        my $path = $fname =~ m{^/} ? $fname : "$HtmlDir/$fname";
        if ($path =~ m{(.*)/} && !-d $1) {
            make_path($1) or bail_out("$name - Cannot create directory $1");
        }
        $body = expand_env_in_text($body, $name, $rand_ports);
        open my $out, '>', $path
            or bail_out("$name - Cannot open $path for writing: $!\n");
        binmode $out;
        print $out $body;
        close $out;
        if ($date) {
            local $ENV{TZ} = 'GMT';
            system('touch', '-t', $date, $path) == 0
                or bail_out("$name - Failed to set the mtime of $path to $date\n");
        }
    }
}

sub write_config_file ($$$) {
    my ($block, $config, $rand_ports) = @_;
    my $name = $block->name;

    master_on() if $UseHup;    # reloading is unreliable without a master

    my $http_config = expand_env_in_text($block->http_config, $name, $rand_ports) // '';
    $config //= '';
    $http_config = $FilterHttpConfig->($http_config) if $FilterHttpConfig;

    my $postpone = $PostponeOutput;
    undef $postpone if $http_config =~ /\bpostpone_output\b/;
    my $extra_http_config = '';
    if (defined $postpone) {
        bail_out("Bad TEST_NGINX_POSTPONE_OUTPUT value: $postpone\n")
            if $postpone !~ /^\d+$/;
        $extra_http_config = "\n    postpone_output $postpone;\n";
    }

    my $main_config = $block->main_config // '';
    if ($LoadModules) {
        my @mods = map { "load_module $_;" } grep { length } split /\s+/, $LoadModules;
        $main_config = join ' ', @mods, $main_config if @mods;
    }
    $main_config = expand_env_in_text($main_config, $name, $rand_ports);
    my $post_main_config =
        expand_env_in_text($block->post_main_config // '', $name, $rand_ports);

    my $err_log_file = $block->error_log_file || $ErrLogFile;
    $err_log_file = expand_env_in_text($err_log_file, $name, $rand_ports);

    my $server_name = $block->server_name // $ServerName;
    (my $quoted_server_name = $server_name) =~ s/\\/\\\\/g;
    $quoted_server_name =~ s/'/\\'/g;

    # Temp dirs inside the server root: a packaged nginx defaults to system
    # paths that may not exist or be writable.
    my %temp = map { $_ => "${_}_temp_path $ServRoot/${_}_temp;" }
               qw(client_body proxy fastcgi scgi uwsgi);
    for my $m (qw(fastcgi scgi uwsgi)) {
        $temp{$m} = '' if $NginxV =~ /--without-http_${m}_module/;
    }
    $temp{proxy} = '' if $http_config =~ /\bproxy_temp_path\b/;
    $temp{client_body} = '' if $http_config =~ /\bclient_body_temp_path\b/;
    my $temp_paths = join ' ', @temp{qw(client_body proxy fastcgi scgi uwsgi)};

    my $env_lines = join '', map { "env $_;\n" } qw(
        MOCKEAGAIN_VERBOSE MOCKEAGAIN MOCKEAGAIN_WRITE_TIMEOUT_PATTERN
        LD_PRELOAD LD_LIBRARY_PATH DYLD_INSERT_LIBRARIES
        DYLD_FORCE_FLAT_NAMESPACE);
    for my $v (@EnvToNginx) {
        $env_lines .= $v =~ /\s/ ? "env '$v';\n" : "env $v;\n";
    }

    my $conf = <<_EOC_;
worker_processes  $Workers;
daemon $DaemonEnabled;
master_process $MasterProcessEnabled;
error_log $err_log_file $LogLevel;
pid       $PidFile;
$env_lines
$main_config

http {
    access_log $AccLogFile; $temp_paths

    default_type text/plain;
    keepalive_timeout  68000ms;

$http_config
    server {
        listen          $ServerAddr:$ServerPort;
        server_name     '$quoted_server_name';
        client_max_body_size 30M;

        # Begin preamble config...
$ConfigPreamble
        # End preamble config...

        # Begin test case config...
$config
        # End test case config.

_EOC_

    if (!$NoRootLocation) {
        $conf .= <<_EOC_;
        location / {
            root $HtmlDir;
            index index.html index.htm;
        }
_EOC_
    }
    $conf .= "    }\n";

    if ($UseHup) {
        # Lets the scaffold see when a reload has taken effect.
        $conf .= <<_EOC_;
    server {
        listen          $ServerAddr:$ServerPort;
        server_name     'Test-Nginx';

        location = /ver {
            return 200 '$ConfigVersion';
        }
    }
_EOC_
    }
    $conf .= $extra_http_config;

    $conf .= <<_EOC_;
}

$post_main_config

events {
    accept_mutex off;

    worker_connections  $WorkerConnections;
_EOC_
    $conf .= "    use $EventType;\n" if $EventType;
    $conf .= "}\n";
    $conf .= "env ASAN_OPTIONS;\nenv MOCKNOEAGAIN_VERBOSE;\nenv MOCKNOEAGAIN;\n";

    if (defined $WorkerUser) {
        $conf .= "user $WorkerUser;\n";
    } elsif ($> == 0) {
        # As root, keep the workers able to read what the scaffold writes.
        $conf .= "user root;\n";
    }

    open my $out, '>', $ConfFile or bail_out("Can't open $ConfFile for writing: $!\n");
    print $out $conf;
    close $out;
}

# ---------------------------------------------------------------------------
# Log files
# ---------------------------------------------------------------------------

# error.log lines not yet examined in this block (all of them with
# check_accum_error_log()).  The pause lets nginx finish its log phase,
# which runs after the response has been sent.
sub error_log_data () {
    sleep $TestNginxSleep * 3;
    my @lines;
    if (open my $in, '<', $ErrLogFile) {
        seek $in, $ErrLogFilePos, 0 if !$CheckAccumErrLog && $ErrLogFilePos > 0;
        @lines = <$in>;
        $ErrLogFilePos = tell($in) unless $CheckAccumErrLog;
        close $in;
    }
    push @lines, splice @ExtraErrLogLines;
    return \@lines;
}

sub access_log_data () {
    sleep $TestNginxSleep * 3;
    open my $in, '<', $AccLogFile or return [];
    my @lines = <$in>;
    close $in;
    return \@lines;
}

# ---------------------------------------------------------------------------
# Building requests
# ---------------------------------------------------------------------------

# "--- more_headers" text -> (CRLF header lines, is_chunked).
sub parse_more_headers ($) {
    my $in = shift;
    my $out = '';
    my $is_chunked;
    for my $header (split /\n+/, $in) {
        next if $header =~ /^\s*#/;
        my ($key, $val) = split /:\s*/, $header, 2;
        $val //= '';
        $is_chunked = 1 if lc($key) eq 'transfer-encoding' && $val eq 'chunked';
        $out .= "$key: $val\r\n";
    }
    return ($out, $is_chunked);
}

# Turns the request spec "METHOD [URI [VERSION]]\n[BODY]", given as one or
# more packets, into wire format: request line, Host and Connection headers,
# the --- more_headers, Content-Length for a (trimmed) body.  The result is
# split again at the positions corresponding to the original packet
# boundaries, so that each packet is sent by its own write.
sub build_request_packets ($$$$$) {
    my ($name, $more_headers, $is_chunked, $conn_header, $packets) = @_;

    my $src = join '', @$packets;
    $src =~ /\A([^\n]*\n?)/;
    my $first = $1;
    bail_out("$name - Request line should be non-empty") if $first eq '';

    $first =~ /^(\s*)(\S+)( *)(?:(\S+)( *))?(?:(\S+)( *))?(\s*)$/
        or bail_out("$name - Request line is not valid. Should be "
                    . "'meth [url [version]]' but got \"$first\".");
    my ($meth, $url, $ver) = ($2, $4, $6);
    # [source offset, length] of each token present.
    my @src_tok = ([$-[2], length $meth],
                   defined $url ? [$-[4], length $url] : undef,
                   defined $ver ? [$-[6], length $ver] : undef);
    $url //= '/';
    $ver //= 'HTTP/1.1';

    my $content_start = length $first;
    my $content = substr $src, $content_start;
    my $lead_trim = 0;
    my $len_header = '';
    if (!$is_chunked && $content ne '' && $more_headers !~ /(?:^|\n)Content-Length:/) {
        $lead_trim = $content =~ /^(\s+)/ ? length $1 : 0;
        $content =~ s/^\s+|\s+$//g;
        $len_header = "Content-Length: " . length($content) . "\r\n";
    }

    $more_headers =~ s/(?<!\r)\n/\r\n/g;
    my $headers = '';
    $headers .= "Host: $ServerName\r\n" if $more_headers !~ /(?:^|\n)Host:/mi;
    $headers .= "Connection: $conn_header\r\n" if $more_headers !~ /(?:^|\n)Connection/mi;
    $headers .= "$more_headers$len_header\r\n";

    my $head = "$meth $url $ver\r\n$headers";
    my $wire = $head . $content;
    return [$wire] if @$packets <= 1;

    # Where each request-line token starts in the output.
    my @out_tok_start = (0, length($meth) + 1, length($meth) + length($url) + 2);
    my $map = sub {
        my $b = shift;
        if ($b >= $content_start) {
            my $off = $b - $content_start - $lead_trim;
            $off = 0 if $off < 0;
            $off = length $content if $off > length $content;
            return length($head) + $off;
        }
        for my $i (0 .. 2) {
            my $t = $src_tok[$i] or next;
            return $out_tok_start[$i] if $b < $t->[0];
            return $out_tok_start[$i] + $b - $t->[0] if $b < $t->[0] + $t->[1];
        }
        return length $head;
    };

    my @out;
    my ($pos, $src_pos) = (0, 0);
    for my $i (0 .. $#$packets) {
        $src_pos += length $packets->[$i];
        my $end = $i == $#$packets ? length $wire : $map->($src_pos);
        $end = $pos if $end < $pos;
        push @out, substr($wire, $pos, $end - $pos);
        $pos = $end;
    }
    return \@out;
}

# The list of connections to make for the block; each connection is a list
# of packets { value => DATA, delay_before => SECONDS }.
sub get_req_from_block ($) {
    my $block = shift;
    my $name = $block->name;
    my @req_list;

    if (defined $block->raw_request) {
        my $raw = $block->raw_request;
        if (ref $raw && ref $raw eq 'ARRAY') {
            push @req_list, [map { { value => $_ } } @$raw];
        } else {
            push @req_list, [{ value => $raw }];
        }
        return \@req_list;
    }

    my $request;
    if (defined $block->request_eval) {
        Test::More::diag("$name - request_eval DEPRECATED. Use request eval instead.");
        $request = eval $block->request_eval;
        warn $@ if $@;
    } else {
        $request = $block->request;
        if (defined $request && !ref $request) {
            # Leading blank lines and "# comment" lines are not part of it.
            1 while $request =~ s/^\s*\#[^\n]+\s+|^\s+//gs;
        }
    }

    my $more_headers = $block->more_headers || '';
    my $headers_for = sub {
        my ($i, $what) = @_;
        if (ref $more_headers eq 'ARRAY') {
            my $hdr = $more_headers->[$i];
            bail_out("--- more_headers lacks data for the $what") unless defined $hdr;
            return parse_more_headers($hdr);
        }
        return parse_more_headers($more_headers);
    };

    if ($block->pipelined_requests) {
        my $reqs = $block->pipelined_requests;
        bail_out("$name - invalid entries in --- pipelined_requests")
            if !ref $reqs || ref $reqs ne 'ARRAY';
        my $data = '';
        for my $i (0 .. $#$reqs) {
            my $req = expand_env_in_text($reqs->[$i], $name, $RandPorts);
            my ($hdr, $chunked) = $headers_for->($i, "$i pipelined request");
            my $conn = $i == $#$reqs ? 'close' : 'keep-alive';
            $data .= build_request_packets($name, $hdr, $chunked, $conn, [$req])->[0];
        }
        push @req_list, [{ value => $data }];
        return \@req_list;
    }

    if (!ref $request) {
        my ($hdr, $chunked) = $headers_for->(0, 'request');
        my $wire = build_request_packets($name, $hdr, $chunked, 'close', [$request // '']);
        push @req_list, [{ value => $wire->[0] }];

    } elsif (ref $request eq 'ARRAY') {
        for my $i (0 .. $#$request) {
            my $one = $request->[$i];
            my ($hdr, $chunked) = $headers_for->($i, "${i}th request");
            if (!ref $one) {
                my $wire = build_request_packets($name, $hdr, $chunked, 'close', [$one]);
                push @req_list, [{ value => $wire->[0] }];
            } elsif (ref $one eq 'ARRAY') {
                my @values = map {
                    !ref $_ ? $_
                    : ref $_ eq 'HASH' ? $_->{value}
                    : bail_out("$name - Invalid syntax. $_ should be a string or hash with value.")
                } @$one;
                my $wire = build_request_packets($name, $hdr, $chunked, 'close', \@values);
                my @packets;
                for my $j (0 .. $#$wire) {
                    my %p = ref $one->[$j] ? %{ $one->[$j] } : ();
                    $p{value} = $wire->[$j];
                    push @packets, \%p;
                }
                push @req_list, \@packets;
            } else {
                bail_out("$name - Invalid syntax. $one should be a string or an array of packets.");
            }
        }

    } else {
        bail_out("$name - invalid ---request : MUST be string or array of requests");
    }

    return \@req_list;
}

# ---------------------------------------------------------------------------
# HTTP client
# ---------------------------------------------------------------------------

# Sends the packets of one connection and reads until the server closes it
# (or the per-I/O timeout expires).  Returns (raw response, is_HEAD).
sub send_request ($$$$) {
    my ($packets, $middle_delay, $timeout, $block) = @_;
    my $name = $block->name;
    my @bits = @$packets;

    my $head_req = (join('', map { $_->{value} } @bits) =~ /^\s*HEAD\s+/) ? 1 : 0;
    my $addr = $block->server_addr_for_client // $ServerAddr;

    my $sock;
    my $err;
    for my $try (1 .. 20) {
        $sock = IO::Socket::INET->new(
            PeerAddr => $addr,
            PeerPort => $ServerPortForClient,
            Proto    => 'tcp',
            Timeout  => $timeout,
        );
        last if $sock;
        $err = $!;
        # Worth retrying only while the server is (still) coming up.
        last if $try > 3 && !running_nginx_pid();
        sleep $TestNginxSleep * $try;
    }
    if (!$sock) {
        Test::More::fail("$name - Can't connect to $addr:$ServerPortForClient: $err (aborted)\n");
        bail_out("$name - too many connection failures") if ++$TotalConnectFailures >= 3;
        return (undef, $head_req);
    }

    local $SIG{PIPE} = 'IGNORE';
    $sock->blocking(0);

    my $resp = '';
    my $wbuf = (shift @bits)->{value} // '';
    my $woff = 0;
    my $writing = 1;
    my $rsel = IO::Select->new($sock);
    my $wsel = IO::Select->new($sock);

    while (1) {
        $! = 0;
        my ($r, $w) = IO::Select->select($rsel, $writing ? $wsel : undef, undef, $timeout);
        if (!$r && !$w) {
            next if $! == EINTR;
            close $sock;
            if (!defined $block->abort) {
                Test::More::fail("ERROR: client socket timed out - $name\n");
            }
            return ($resp, $head_req);
        }

        if ($w && @$w) {
            while ($writing) {
                if ($woff < length $wbuf) {
                    my $n = syswrite($sock, $wbuf, length($wbuf) - $woff, $woff);
                    if (!defined $n) {
                        last if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
                        # The server closed early; still read what it sent.
                        warn "$name - write failed: $!\n" if $Verbose;
                        $writing = 0;
                        last;
                    }
                    $woff += $n;
                    next;
                }
                my $next = shift @bits;
                if (!$next) {
                    $writing = 0;
                    my $shutdown = $block->shutdown;
                    if (defined $shutdown) {
                        $shutdown = 1 if $shutdown =~ /^\s*$/;
                        shutdown($sock, $shutdown);
                    }
                    last;
                }
                my $delay = $next->{delay_before} // $middle_delay;
                sleep $delay if $delay;
                ($wbuf, $woff) = ($next->{value} // '', 0);
            }
        }

        if ($r && @$r) {
            while (1) {
                my $n = sysread($sock, my $buf, 65536);
                if (!defined $n) {
                    last if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
                    warn "WARNING: $name - HTTP response read failure: $!\n";
                    close $sock;
                    return ($resp, $head_req);
                }
                if ($n == 0) {
                    close $sock;
                    return ($resp, $head_req);
                }
                $resp .= $buf;
            }
        }
    }
}

# Parses one response from the start of $raw_resp.  Returns (HTTP::Response
# with a de-chunked body, raw header text, bytes left after this response).
sub parse_response ($$$) {
    my ($name, $raw_resp, $head_req) = @_;

    my $raw_headers = $raw_resp =~ /(.*?\r\n)\r\n/s ? $1 : '';
    my $res = HTTP::Response->parse($raw_resp);

    my $code = $res->code;
    if ($code && $code !~ /^\d+$/) {
        undef $code;
        $res->code(undef);
    }
    return ($res, $raw_headers) if $code && ($code == 304 || $code == 101);

    my $left;
    my $enc = $res->header('Transfer-Encoding');
    my $len = $res->header('Content-Length');
    my $raw = $res->content // '';

    if ($head_req) {
        # A HEAD response has no body, whatever its headers say.
        $left = $raw if length $raw;
        $res->content('');

    } elsif (defined $enc && $enc eq 'chunked') {
        my $body = '';
        my $pos = 0;
        while (1) {
            pos($raw) = $pos;
            if ($raw !~ /\G[ \t]*([0-9A-Fa-f]+)[ \t]*(?:;[^\r\n]*)?\r\n/gc) {
                my $rest = substr $raw, $pos;
                Test::More::fail($rest eq ''
                    ? "$name - no last chunk found - $raw"
                    : "$name - invalid chunked body received: $rest");
                return;
            }
            my $size = hex $1;
            $pos = pos $raw;
            if ($size == 0) {
                # Optional trailer fields, then the final CRLF.
                pos($raw) = $pos;
                $raw =~ /\G(?:[^\r\n]+\r\n)*/gc;
                if ($raw !~ /\G\r\n/gc) {
                    Test::More::fail("$name - invalid chunked data received (expected CRLF).");
                    return;
                }
                $pos = pos $raw;
                last;
            }
            if (length($raw) - $pos < $size) {
                Test::More::fail("$name - invalid chunked data received "
                                 . "(not enough octets for the data section)");
                return;
            }
            $body .= substr $raw, $pos, $size;
            $pos += $size;
            if (substr($raw, $pos, 2) ne "\r\n") {
                Test::More::fail("$name - invalid chunked data received (expected CRLF).");
                return;
            }
            $pos += 2;
        }
        $left = substr $raw, $pos if $pos < length $raw;
        $res->content($body);

    } elsif (defined $len && $len =~ /^\s*\d+\s*$/) {
        if (length $raw < $len) {
            warn "WARNING: $name - response body truncated: $len expected, but got ",
                 length $raw, "\n";
        } elsif (length $raw > $len) {
            $left = substr $raw, $len;
            $res->content(substr $raw, 0, $len);
        }
    }

    return ($res, $raw_headers, $left);
}

# ---------------------------------------------------------------------------
# Checks.  Every subtest goes through run_subtest() so that a dry run skips it
# and a block whose nginx failed to start fails it, keeping the number of
# subtests identical in all cases.
# ---------------------------------------------------------------------------

sub run_subtest ($$&) {
    my ($desc, $section, $code) = @_;
    my $tb = Test::More->builder;
    if ($DryRun) {
        my $name = $CurrentName // '';
        $name .= " - $section" if $section;
        return $tb->skip("$name - tests skipped due to $DryRun");
    }
    if (defined $StartError) {
        return Test::More::fail($desc);
    }
    local $Test::Builder::Level = $Test::Builder::Level + 2;
    return $code->();
}

# With several requests in the block every expectation must be an array,
# indexed by request.
sub get_indexed_value ($$$$) {
    my ($name, $value, $req_idx, $need_array) = @_;
    my $is_array = ref $value && ref $value eq 'ARRAY';
    if ($need_array) {
        return $value->[$req_idx] if $is_array;
        bail_out("$name - You asked for many requests, the expected results "
                 . "should be arrays as well.");
    }
    return $is_array ? $value->[0] : $value;
}

sub check_error_code ($$$$) {
    my ($block, $res, $req_idx, $need_array) = @_;
    my $name = $block->name;
    my $code = ($res && $res->code) || '';
    run_subtest "$name - status code ok", "", sub {
        if (defined $block->error_code_like) {
            my $pat = get_indexed_value($name, $block->error_code_like, $req_idx, $need_array);
            Test::More::like($code, qr/$pat/sm, "$name - status code ok");
        } elsif (defined $block->error_code) {
            Test::More::is($code,
                get_indexed_value($name, $block->error_code, $req_idx, $need_array),
                "$name - status code ok");
        } else {
            Test::More::is($code, 200, "$name - status code ok");
        }
    };
}

sub check_raw_response_headers ($$$$) {
    my ($block, $raw_headers, $req_idx, $need_array) = @_;
    my $name = $block->name;
    if (defined $block->raw_response_headers_like) {
        my $pat = get_indexed_value($name, $block->raw_response_headers_like,
                                    $req_idx, $need_array);
        run_subtest "$name - raw resp headers like", "raw_response_headers_like", sub {
            Test::More::like($raw_headers, qr/$pat/s, "$name - raw resp headers like");
        };
    }
    if (defined $block->raw_response_headers_unlike) {
        my $pat = get_indexed_value($name, $block->raw_response_headers_unlike,
                                    $req_idx, $need_array);
        run_subtest "$name - raw resp headers unlike", "raw_response_headers_unlike", sub {
            Test::More::unlike($raw_headers, qr/$pat/s, "$name - raw resp headers unlike");
        };
    }
}

sub check_response_headers ($$$$$) {
    my ($block, $res, $raw_headers, $req_idx, $need_array) = @_;
    my $name = $block->name;

    if (defined $block->response_headers) {
        my $headers = parse_headers(get_indexed_value($name, $block->response_headers,
                                                      $req_idx, $need_array));
        for my $key (sort keys %$headers) {
            my $val = $headers->{$key};
            if (!defined $val) {
                my $desc = "$name - header $key not present in the raw headers";
                run_subtest $desc, "response_headers", sub {
                    Test::More::unlike($raw_headers, qr/^\s*\Q$key\E\s*:/ms, $desc);
                };
                next;
            }
            $val =~ s/\$ServerPort\b/$ServerPort/g;
            $val =~ s/\$ServerPortForClient\b/$ServerPortForClient/g;
            my $actual = ($res ? $res->header($key) : undef) // '';
            run_subtest "$name - header $key ok", "response_headers", sub {
                Test::More::is($actual, $val, "$name - header $key ok");
            };
        }

    } elsif (defined $block->response_headers_like) {
        my $headers = parse_headers(get_indexed_value($name, $block->response_headers_like,
                                                      $req_idx, $need_array));
        for my $key (sort keys %$headers) {
            my $val = $headers->{$key} // '';
            my $actual = ($res ? $res->header($key) : undef) // '';
            run_subtest "$name - header $key like ok", "response_headers_like", sub {
                Test::More::like($actual, qr/^$val$/, "$name - header $key like ok");
            };
        }
    }
}

my %BuiltinBodyFilters = (
    md5_hex  => sub { require Digest::MD5; Digest::MD5::md5_hex($_[0]) },
    sha1_hex => sub { require Digest::SHA; Digest::SHA::sha1_hex($_[0]) },
    uc       => sub { uc $_[0] },
    lc       => sub { lc $_[0] },
    ucfirst  => sub { ucfirst $_[0] },
    lcfirst  => sub { lcfirst $_[0] },
    length   => sub { length $_[0] },
);

sub run_body_filter ($$$) {
    my ($block, $filter, $content) = @_;
    return $filter->($content) if ref $filter eq 'CODE';
    if (!ref $filter) {
        my $f = $BuiltinBodyFilters{$filter}
            or bail_out($block->name . " - unknown filter, \"$filter\", specified "
                        . "in the --- response_body_filters section");
        return $f->($content);
    }
    bail_out($block->name . " - the --- response_body_filters section only supports "
             . "subroutine reference values and string values");
}

# --- response_body_filters: applied to the body before it is compared.
sub transform_response_body ($$$) {
    my ($block, $res, $req_idx) = @_;
    return unless $res && defined $res->content;
    my $filters = $block->response_body_filters;
    return unless defined $filters;

    if (!ref $filters) {
        (my $list = $filters) =~ s/^\s+|\s+$//g;
        $filters = [split /\s+/, $list];
    } elsif (ref $filters ne 'ARRAY') {
        $filters = [$filters];
    }
    if (ref $filters->[0] eq 'ARRAY') {     # one filter list per request
        for (@$filters) {
            bail_out($block->name . " - the --- response_body_filters two-dimensional "
                     . "array only be like [[uc], [lc]] not [[uc], lc]")
                if ref $_ ne 'ARRAY';
        }
        $filters = $filters->[$req_idx];
        bail_out($block->name . " - the ---response_body_filters two-dimensional array "
                 . "unmatch the specified request($req_idx)") unless defined $filters;
    }

    my $content = $res->content;
    $content = run_body_filter($block, $_, $content) for @$filters;
    $res->content($content);
}

sub check_response_body ($$$$$) {
    my ($block, $res, $req_idx, $repeated_req_idx, $need_array) = @_;
    my $name = $block->name;

    if (defined(my $file = $block->write_resp_body_file)) {
        if ($res) {
            open my $out, '>', $file
                or bail_out("$name - failed to write to file '$file': $!");
            print $out $res->content // '';
            close $out;
        }
    }

    my $body = $res ? $res->content : undef;
    my $content = $body;
    if (defined $content) {
        # Legacy clean-up kept from the original scaffold.
        $content =~ s/^TE: deflate,gzip;q=0\.3\r\n//gm;
        $content =~ s/^Connection: TE, close\r\n//gm;
    }

    if (defined $block->response_body || defined $block->response_body_eval) {
        if (defined $block->response_body_json_sort && defined $content) {
            my $js = JSON::PP->new->canonical(1);
            my $obj = eval { $js->loose(1)->decode($content) };
            $content = $js->encode($obj) . "\n" unless $@;
        }

        my $expected;
        if ($block->response_body_eval) {
            Test::More::diag("$name - response_body_eval is DEPRECATED. "
                             . "Use response_body eval instead.");
            $expected = eval get_indexed_value($name, $block->response_body_eval,
                                               $req_idx, $need_array);
            warn $@ if $@;
        } else {
            $expected = get_indexed_value($name, $block->response_body,
                                          $req_idx, $need_array);
        }

        Encode::from_to($expected, 'UTF-8', $block->charset)
            if $block->charset && defined $expected;

        if (defined $expected && !ref $expected) {
            $expected =~ s/\$ServerPort\b/$ServerPort/g;
            $expected =~ s/\$ServerPortForClient\b/$ServerPortForClient/g;
            $expected = expand_env_in_text($expected, $name, $RandPorts);
        }

        if (ref $expected) {
            my $desc = "$name - response_body - like (repeated req $repeated_req_idx, req $req_idx)";
            run_subtest $desc, "response_body", sub { Test::More::like($content, $expected, $desc) };
        } else {
            my $desc = "$name - response_body - response is expected "
                     . "(repeated req $repeated_req_idx, req $req_idx)";
            run_subtest $desc, "response_body", sub {
                $NoLongString ? Test::More::is($content, $expected, $desc)
                              : Test::LongString::is_string($content, $expected, $desc);
            };
        }

    } elsif (defined $block->response_body_like || defined $block->response_body_unlike) {
        my $type = defined $block->response_body_like ? 'like' : 'unlike';
        my $patterns = $type eq 'like' ? $block->response_body_like
                                       : $block->response_body_unlike;
        my $pat = get_indexed_value($name, $patterns, $req_idx, $need_array);
        $pat =~ s/\$ServerPort\b/$ServerPort/g;
        $pat =~ s/\$ServerPortForClient\b/$ServerPortForClient/g;
        my $summary = trim($content) // '';
        my $desc = "$name - response_body_$type - response is expected ($summary)";
        run_subtest $desc, "response_body_$type", sub {
            $type eq 'like' ? Test::More::like($content, qr/$pat/s, $desc)
                            : Test::More::unlike($content, qr/$pat/s, $desc);
        };
    }

    for my $check (@ResponseBodyChecks) {
        $check->($block, $body, $req_idx, $repeated_req_idx, $DryRun);
    }
}

# Normalizes an error_log-like section to a fresh list of patterns: plain
# text gives one substring per line; eval may give a qr// or an array.
sub pattern_list ($) {
    my $pats = shift;
    if (!ref $pats) {
        chomp $pats;
        return [split /\n+/, $pats];
    }
    return [$pats] if ref $pats eq 'Regexp';
    return [@$pats];
}

sub line_matches ($$) {
    my ($line, $pat) = @_;
    return ref $pat ? $line =~ /$pat/ : index($line, $pat) >= 0;
}

sub value_contains ($$);
sub value_contains ($$) {
    my ($val, $str) = @_;
    return index("$val", $str) >= 0 if !ref $val || ref $val eq 'Regexp';
    if (ref $val eq 'ARRAY') {
        for (@$val) { return 1 if defined && value_contains($_, $str) }
    }
    return 0;
}

# "Each pattern matches some line": one subtest per pattern.
sub check_patterns_present ($$$$$$) {
    my ($name, $section, $pats, $lines, $what, $suffix) = @_;
    for my $pat (@$pats) {
        next unless defined $pat;
        my $found = grep { line_matches($_, $pat) } @$lines;
        if ($found) {
            my $desc = "$name - pattern \"$pat\" matches a line in $what$suffix";
            run_subtest $desc, $section, sub { Test::More::pass($desc) };
        } else {
            my $desc = "$name - pattern \"$pat\" should match a line in $what$suffix";
            run_subtest $desc, $section, sub { Test::More::fail($desc) };
        }
    }
}

# "No pattern matches any line": one subtest per pattern (upstream emits
# one failure per matching line instead).
sub check_patterns_absent ($$$$$$) {
    my ($name, $section, $pats, $lines, $what, $suffix) = @_;
    for my $pat (@$pats) {
        next unless defined $pat;
        my $p = fmt_str($pat);
        my ($i) = grep { line_matches($lines->[$_], $pat) } 0 .. $#$lines;
        if (defined $i) {
            my $ln = fmt_str($lines->[$i]);
            my @more = @$lines[$i + 1 .. min($i + 9, $#$lines)];
            my $desc = "$name - pattern \"$p\" should not match any line in $what "
                     . "but matches line \"$ln\"$suffix";
            run_subtest $desc, $section, sub { Test::More::fail($desc . "\n" . join '', @more) };
        } else {
            my $desc = "$name - pattern \"$p\" does not match a line in $what$suffix";
            run_subtest $desc, $section, sub { Test::More::pass($desc) };
        }
    }
}

# --- grep_error_log / grep_error_log_out / error_log / no_error_log, run
# against the error.log lines written since the previous check.
sub check_error_log ($$$$$) {
    my ($block, $res, $dry_run, $repeated_req_idx, $need_array) = @_;
    my $name = $block->name;
    my $lines;
    my %warn_about = ('[alert]' => 1, '[crit]' => 1, '[emerg]' => 1);

    my $grep_pat = $block->grep_error_log;
    $grep_pat = $grep_pat->[$repeated_req_idx] if ref $grep_pat && ref $grep_pat eq 'ARRAY';
    if (!defined $block->grep_error_log && defined $block->grep_error_log_out) {
        bail_out("$name - No --- grep_error_log defined but --- grep_error_log_out is defined");
    }

    if (defined $grep_pat) {
        my $expected = $block->grep_error_log_out;
        bail_out("$name - No --- grep_error_log_out defined but --- grep_error_log is defined")
            unless defined $expected;
        $expected = expand_env_in_text($expected, $name, $RandPorts) unless ref $expected;
        $expected = $expected->[$repeated_req_idx]
            if ref $expected && ref $expected eq 'ARRAY';

        my $desc = "$name - grep_error_log_out (req $repeated_req_idx)";
        run_subtest $desc, "error_log", sub {
            $lines ||= error_log_data();
            my $matched = '';
            for my $line (@$lines) {
                if (ref $grep_pat ? $line =~ /$grep_pat/ : $line =~ /\Q$grep_pat\E/) {
                    $matched .= "$&\n" if $& !~ /\n/;
                }
            }
            if (ref $expected eq 'Regexp') {
                Test::More::like($matched, $expected, $desc);
            } elsif ($NoLongString) {
                Test::More::is($matched, $expected, $desc);
            } else {
                Test::LongString::is_string($matched, $expected, $desc);
            }
        };
    }

    for my $sec (qw(error_log no_error_log)) {
        my $pats = $block->$sec;
        next unless defined $pats;
        for my $level (keys %warn_about) {
            (my $prefix = $level) =~ s/\]$//;
            delete $warn_about{$level} if value_contains($pats, $prefix);
        }
        $lines ||= error_log_data() unless $DryRun || defined $StartError;
        $lines ||= [];
        if ($sec eq 'error_log') {
            check_patterns_present($name, $sec, pattern_list($pats), $lines, 'error.log',
                                   " (req $repeated_req_idx)");
        } else {
            check_patterns_absent($name, $sec, pattern_list($pats), $lines, 'error.log',
                                  " (req $repeated_req_idx)");
        }
    }

    return if $DryRun || defined $StartError;

    # Unexpected serious messages are worth seeing even when not tested.
    if (%warn_about) {
        $lines ||= error_log_data();
        for my $line (@$lines) {
            next if $line =~ /^nginx: /;    # must_die: stderr copy of error.log
            for my $level (keys %warn_about) {
                if (index($line, $level) >= 0) {
                    warn "WARNING: $name - " . fmt_str($line) . "\n";
                    last;
                }
            }
        }
    }
}

sub check_access_log ($$) {
    my ($block, $repeated_req_idx) = @_;
    my $name = $block->name;
    for my $sec (qw(access_log no_access_log)) {
        my $pats = $block->$sec;
        next unless defined $pats;
        my $lines = ($DryRun || defined $StartError) ? [] : access_log_data();
        if ($sec eq 'access_log') {
            check_patterns_present($name, $sec, pattern_list($pats), $lines, 'access.log',
                                   " (req $repeated_req_idx)");
        } else {
            check_patterns_absent($name, $sec, pattern_list($pats), $lines, 'access.log',
                                  " (req $repeated_req_idx)");
        }
    }
}

# --- shutdown_error_log / no_shutdown_error_log of the previous block,
# checked once its nginx has been stopped.
sub check_prev_block_shutdown_error_log () {
    my $block = $PrevBlock or return;
    return unless defined $block->shutdown_error_log
               || defined $block->no_shutdown_error_log;

    local $DryRun = ($UseHup || $ENV{TEST_NGINX_NO_CLEAN}) ? 'dry_run' : undef;
    local $StartError;
    local $CurrentName = $block->name;
    my $name = $block->name;
    my $lines = $DryRun ? [] : error_log_data();

    if (defined $block->shutdown_error_log) {
        my $pats = pattern_list($block->shutdown_error_log);
        for my $pat (@$pats) {
            my $ok = grep { line_matches($_, $pat) } @$lines;
            my $desc = $ok ? "$name - pattern \"$pat\" matches a line in error.log"
                           : "$name - pattern \"$pat\" should match a line in error.log";
            run_subtest $desc, "shutdown_error_log", sub { Test::More::ok($ok, $desc) };
        }
    }
    if (defined $block->no_shutdown_error_log) {
        my $pats = pattern_list($block->no_shutdown_error_log);
        for my $pat (@$pats) {
            my $p = fmt_str($pat);
            my ($line) = grep { line_matches($_, $pat) } @$lines;
            my $desc = defined $line
                ? "$name - pattern \"$p\" should not match any line in error.log "
                  . "but matches line \"" . fmt_str($line) . "\""
                : "$name - pattern \"$p\" does not match a line in error.log";
            run_subtest $desc, "no_shutdown_error_log", sub { Test::More::ok(!defined $line, $desc) };
        }
    }
}

# One repetition of a block: send every request, check every response, then
# the logs.
sub run_test_helper ($$$) {
    my ($block, $dry_run, $repeated_req_idx) = @_;
    my $name = $block->name;

    my $reqs = get_req_from_block($block);
    bail_out("$name - request empty") unless @$reqs;

    if (defined $block->curl) {
        my $first = join '', map { $_->{value} } @{ $reqs->[0] };
        if ($first =~ /^(\S+) (\S+)/) {
            warn "# curl -i -sS -X $1 'http://$ServerAddr:$ServerPortForClient$2'\n";
        }
    }

    my $timeout = parse_time($block->timeout) // timeout();

    my ($res, $need_array, $pending);
    my $req_idx = 0;
    for my $i (0 .. $#$reqs) {
        my ($raw, $head_req) = ('', 0);
        if (!$DryRun && !defined $StartError) {
            ($raw, $head_req) = send_request($reqs->[$i], $block->raw_request_middle_delay,
                                             $timeout, $block);
        }
        $raw //= '';

        # Pipelined requests share one connection: parse one response
        # after the other out of the same data.
        if ($block->pipelined_requests) {
            $pending = @{ $block->pipelined_requests };
            $need_array = 1;
        } else {
            $pending = 0;
            $need_array = @$reqs > 1;
        }

        while (1) {
            my ($raw_headers, $left) = ('');
            if (!defined $block->ignore_response) {
                if (defined $block->http09) {
                    $res = HTTP::Response->new(200, 'OK', [], $raw);
                } else {
                    ($res, $raw_headers, $left) = parse_response($name, $raw, $head_req);
                    $raw_headers //= '';
                }
            }

            if ($pending) {
                $raw = $left // '';
                $pending--;
            } elsif (defined $left && length $left) {
                (my $show = $left) =~ s/([\0-\037\200-\377])/sprintf('\x{%02x}', ord $1)/eg;
                warn "WARNING: $name - unexpected extra bytes after last chunk in "
                     . "response: \"$show\"\n";
            }

            if (!defined $block->ignore_response) {
                check_error_code($block, $res, $req_idx, $need_array);
                check_raw_response_headers($block, $raw_headers, $req_idx, $need_array);
                check_response_headers($block, $res, $raw_headers, $req_idx, $need_array);
                transform_response_body($block, $res, $req_idx);
                check_response_body($block, $res, $req_idx, $repeated_req_idx, $need_array);
            }

            # The logs are checked after every response but the last one
            # here, and after the last one below.
            if ($pending || $i < $#$reqs) {
                sleep $block->wait if $block->wait && !$DryRun;
                check_error_log($block, $res, $dry_run, $repeated_req_idx, $need_array);
                check_access_log($block, $repeated_req_idx)
                    unless defined $block->ignore_response;
            }

            $req_idx++;
            last unless $pending;
        }
    }

    sleep $block->wait if $block->wait && !$DryRun;
    check_error_log($block, $res, $dry_run, $repeated_req_idx, $need_array);
    check_access_log($block, $repeated_req_idx) unless defined $block->ignore_response;
}

$RunTestHelper = \&run_test_helper;
$CheckErrorLog = \&check_error_log;
$CheckShutdownErrorLog = \&check_prev_block_shutdown_error_log;

# ---------------------------------------------------------------------------
# Running blocks
# ---------------------------------------------------------------------------

# Sections of the original format that this subset cannot honour; a block
# using one of them is refused instead of being tested differently.
my @UnsupportedSections = qw(
    http2 http3 tcp_listen tcp_reply tcp_query tcp_query_len udp_listen
    udp_reply udp_query stap stap_out stap_out_like stap_out_unlike
    skip_slave todo_nginx
);

# Evaluates --- skip_eval / skip_nginx / skip_nginx2 / skip_openssl / todo.
# Returns (number of subtests to skip, should skip, should todo, reason).
sub skip_and_todo ($) {
    my $block = shift;
    my $name = $block->name;
    my ($n, $skip, $todo, $reason);

    if (defined(my $spec = $block->skip_eval)) {
        if ($spec =~ /^\s*(\d+)\s*:\s*(.*)/s) {
            ($n, $reason) = ($1, 'skip_eval');
            my $code = $2;
            $skip = eval $code;
            bail_out("$name - skip_eval - failed to eval the Perl code \"$code\": $@") if $@;
        }
    }

    my $ver_re = qr/([<>]=?)\s*(\d+)\.(\d+)\.(\d+)/;
    if (defined(my $spec = $block->skip_nginx)) {
        $spec =~ /^\s*(\d+)\s*:\s*$ver_re(?:\s*:\s*(.*))?\s*$/
            or bail_out("$name - Invalid --- skip_nginx spec: $spec");
        my ($cnt, $op, $v) = ($1, $2, get_canon_version($3, $4, $5));
        ($n, $reason) = ($cnt, $6 || "nginx version $op $3.$4.$5");
        $skip = 1 if !defined $NginxVersion ? $op =~ /^</
                                            : version_cmp($NginxVersion, $op, $v);
    } elsif (defined(my $spec2 = $block->skip_nginx2)) {
        $spec2 =~ /^\s*(\d+)\s*:\s*$ver_re\s*(or|and)\s*$ver_re(?:\s*:\s*(.*))?\s*$/
            or bail_out("$name - Invalid --- skip_nginx2 spec: $spec2");
        my ($cnt, $opa, $va, $opx, $opb, $vb) =
            ($1, $2, get_canon_version($3, $4, $5), $6, $7, get_canon_version($8, $9, $10));
        ($n, $reason) = ($cnt, $11);
        my $a = defined $NginxVersion && version_cmp($NginxVersion, $opa, $va);
        my $b = defined $NginxVersion && version_cmp($NginxVersion, $opb, $vb);
        $skip = 1 if !defined $NginxVersion || ($opx eq 'or' ? ($a || $b) : ($a && $b));
    }

    if (defined(my $spec = $block->skip_openssl)) {
        $spec =~ /^\s*(\d+)\s*:\s*([<>]=?)\s*(\d+)\.(\d+)\.(\d+)([a-z])?(?:\s*:\s*(.*))?\s*$/
            or bail_out("$name - Invalid --- skip_openssl spec: $spec");
        my ($cnt, $op) = ($1, $2);
        my $v = get_canon_openssl_version($3, $4, $5, $6);
        $n = $cnt;
        $reason = $7 || (defined $OpenSSLVersion ? "OpenSSL version $op $3.$4.$5" . ($6 // '')
                                                 : 'Not built with OpenSSL');
        $skip = 1 if !defined $OpenSSLVersion || version_cmp($OpenSSLVersion, $op, $v);
    }

    if (defined(my $spec = $block->todo)) {
        $spec =~ /^\s*(\d+)\s*:\s*(.*)/s
            or bail_out("$name - Invalid --- todo spec: $spec");
        ($todo, $n, $reason) = (1, $1, $2);
    }

    return ($n, $skip, $todo, $reason // 'various reasons');
}

# HUP mode: waits until the server answers /ver with the new marker.
sub wait_for_config_version ($) {
    my $name = shift;
    my $ok = 0;
    for my $try (1 .. 200) {
        my $sock = IO::Socket::INET->new(PeerAddr => $ServerAddr, PeerPort => $ServerPort,
                                         Proto => 'tcp', Timeout => 2);
        my $ver = '';
        if ($sock) {
            print $sock "GET /ver HTTP/1.0\r\nHost: Test-Nginx\r\n\r\n";
            my $resp = do { local $/; <$sock> } // '';
            close $sock;
            $ver = $1 if $resp =~ /\r\n\r\n(.*)\z/s;
        }
        if ($ver eq $ConfigVersion) {
            return if ++$ok >= 5;
            next;
        }
        $ok = 0;
        sleep min(1, $TestNginxSleep * $try);
    }
    Test::More::fail("$name - failed to reload configuration after 200 failed test requests");
}

# (Re)starts nginx for the block.  Returns 1 when nginx was started from
# scratch; sets $StartError or $DryRun when it could not be.
sub start_nginx_for_block ($$$$) {
    my ($block, $config, $rand_ports, $first_time) = @_;
    my $name = $block->name;

    if ($UseHup && !$first_time && defined(my $pid = running_nginx_pid())) {
        setup_server_root(0);
        run_customer_init_script($block);
        write_user_files($block, $rand_ports);
        write_config_file($block, $config, $rand_ports);
        kill SIGUSR1, $pid;          # reopen the (removed) log files
        sleep $TestNginxSleep;
        kill SIGHUP, $pid;           # reload the configuration
        sleep $TestNginxSleep * 3;
        if (defined $block->reload_fails) {
            sleep 0.3;
        } else {
            wait_for_config_version($name);
            # The new workers answer /ver about 100 ms before the master
            # tells the old ones to stop accepting (ngx_master_process_cycle
            # sleeps between the two): until then a request of the block
            # can still reach an old worker with the old configuration.
            select undef, undef, undef, 0.25;
        }
        check_prev_block_shutdown_error_log();
        return 0;
    }

    stop_nginx($name);
    check_prev_block_shutdown_error_log();

    setup_server_root($first_time);
    run_customer_init_script($block);
    write_user_files($block, $rand_ports);
    write_config_file($block, $config, $rand_ports);

    $ErrLogFilePos = 0;
    my $cmd = nginx_cmd_line();
    warn "starting nginx: @$cmd\n" if $Verbose;

    my ($status, $stderr);
    for my $try (1 .. 5) {
        ($status, $stderr) = run_nginx($block, $cmd);
        last if $status == 0 || $stderr !~ /Address already in use/;
        sleep 0.2 * $try;    # the previous server may still hold the port
    }

    if ($status != 0) {
        my $missing;
        if ($ENV{TEST_NGINX_IGNORE_MISSING_DIRECTIVES}
            && open my $in, '<', $ErrLogFile)
        {
            while (<$in>) {
                if (/\[emerg\] \S+?: unknown directive "([^"]+)"/) { $missing = $1; last }
            }
            close $in;
        }
        if (defined $missing) {
            $DryRun = "the lack of directive $missing";
        } else {
            my $why = $stderr =~ /\S/ ? $stderr : tail_of_error_log(10);
            $StartError = "Cannot start nginx using command \"@$cmd\" "
                        . "(exit status " . ($status >> 8) . ")";
            Test::More::diag("$name - $StartError:\n$why");
        }
        return 1;
    }

    sleep $TestNginxSleep;
    return 1;
}

# --- must_die: nginx has to exit with an error (or the given exit code).
sub run_must_die_block ($$) {
    my ($block, $must_die) = @_;
    my $name = $block->name;
    my $cmd = nginx_cmd_line();

    $ErrLogFilePos = 0;
    for my $i (0 .. $RepeatEach - 1) {
        my ($status, $stderr) = run_nginx($block, $cmd);
        my $exit_code = $status >> 8;
        my $coredump = $status & 128;

        if ($status == -1 || $exit_code == 127 && $stderr =~ /^cannot exec/) {
            Test::More::fail("$name - failed to execute the nginx command line");
        } elsif ($coredump) {
            Test::More::fail("$name - nginx core dumped");
        } elsif (looks_like_number($must_die)) {
            Test::More::is($must_die, $exit_code, "$name - die with the expected exit code");
        } else {
            Test::More::isnt($status, 0, "$name - die as expected");
        }

        # The startup errors also went to stderr; check them with error.log.
        @ExtraErrLogLines = grep { /\S/ } split /^/m, $stderr;
        check_error_log($block, undef, 0, $i, 0);
        @ExtraErrLogLines = ();

        if ($status == 0) {
            warn "WARNING: $name - nginx must die but it does not; killing it (req $i)\n";
            for (1 .. 15) { last if -f $PidFile; sleep $TestNginxSleep }
            stop_nginx($name);
        }
    }
}

sub run_test ($) {
    my $block = shift;
    return if defined $block->SKIP;

    my $name = $block->name;
    for my $sec (@UnsupportedSections) {
        bail_out("$name - section --- $sec is not supported by this Test::Nginx subset")
            if defined $block->$sec;
    }

    my $first_time = $FirstTime;
    undef $FirstTime;

    my $rand_ports = {};
    $RandPorts = $rand_ports;
    local $DryRun;
    local $StartError;
    local $CurrentName = $name;
    local $LogLevel = $block->log_level || $LogLevel;
    local $UseHup = $UseHup;

    my $config = expand_env_in_text($block->config, $name, $rand_ports);
    my $must_die = $block->must_die;
    undef $UseHup if defined $must_die;

    # Without a --- config the block talks to the nginx already running.
    my ($should_restart, $should_reconfig) = (1, 1);
    if (!defined $config) {
        if (!$NoNginxManager && !defined $PrevConfig) {
            bail_out("$name - No '--- config' section specified and could not get "
                     . "previous one. Use TEST_NGINX_NO_NGINX_MANAGER ?");
        }
        ($should_restart, $should_reconfig) = (0, 0);
    } elsif ($NoNginxManager) {
        Test::More::diag("NO_NGINX_MANAGER activated: config for $name ignored");
        ($should_restart, $should_reconfig) = (0, 0);
    } else {
        $should_reconfig = !defined $PrevConfig || $config ne $PrevConfig;
        $should_restart = $should_reconfig || $ForceRestartOnTest;
    }

    my ($tests_to_skip, $should_skip, $should_todo, $reason) = skip_and_todo($block);

    if (!$NoNginxManager && !$should_skip && $should_restart) {
        $ConfigVersion = join '', map { ('A' .. 'Z', 'a' .. 'z', 0 .. 9)[rand 62] } 1 .. 10
            if $UseHup;
        $PrevConfig = $config if $should_reconfig;

        if (defined $must_die) {
            stop_nginx($name);
            check_prev_block_shutdown_error_log();
            setup_server_root($first_time);
            run_customer_init_script($block);
            write_user_files($block, $rand_ports);
            write_config_file($block, $config, $rand_ports);
            run_must_die_block($block, $must_die);
            return;
        }

        start_nginx_for_block($block, $config, $rand_ports, $first_time);
    }

    if ($block->init) {
        eval $block->init;
        bail_out("$name - init failed: $@") if $@;
    }

    $ErrLogFilePos = 0;
    for my $i (1 .. $RepeatEach) {
        write_user_files($block, $rand_ports) if $i > 1;

        if ($should_skip && defined $tests_to_skip) {
            Test::More->builder->skip("$name - $reason") for 1 .. $tests_to_skip;
        } elsif ($should_todo) {
            Test::More->builder->todo_skip("$name - $reason") for 1 .. $tests_to_skip;
        } else {
            run_test_helper($block, $DryRun, $i - 1);
        }
    }

    if (my $total_errlog = $ENV{TEST_NGINX_ERROR_LOG}) {
        if (-s $ErrLogFile && open my $out, '>>', $total_errlog) {
            print $out "\n=== $0 $name\n";
            if (open my $in, '<', $ErrLogFile) {
                local $/ = \65536;
                print $out $_ while <$in>;
                close $in;
            }
            close $out;
        }
    }
}

sub cleanup_test ($) {
    my $block = shift;
    $_->($block) for @TestCleanupHandlers;
}

sub cleanup () {
    $_->() for @CleanupHandlers;
}

sub run_tests () {
    srand($$ + Time::HiRes::time() * 1000000);

    for my $var (qw(TEST_NGINX_USE_VALGRIND TEST_NGINX_USE_STAP TEST_NGINX_CHECK_LEAK
                    TEST_NGINX_BENCHMARK TEST_NGINX_USE_HTTP2 TEST_NGINX_USE_HTTP3
                    TEST_NGINX_USE_RR))
    {
        warn "WARNING: $var is not supported by this Test::Nginx subset; ignored\n"
            if $ENV{$var};
    }

    $NginxVersion = get_nginx_version() unless $NoNginxManager;
    $ENV{TEST_NGINX_SERVER_PORT} //= $ServerPort;

    my @blocks = Test::Base::blocks();
    @blocks = shuffle(@blocks) unless $NoShuffle;

    for my $block (@blocks) {
        $_->($block) for @BlockPreprocessors;
        $block->set_value(name => "$0 " . $block->name);
        run_test($block);
        cleanup_test($block);
        $PrevBlock = $block;
    }

    cleanup();
}

END {
    return if $InSubprocess;
    local $?;    # keep Test::Builder's exit status

    if (!$ENV{TEST_NGINX_NO_CLEAN} && !$NoNginxManager) {
        stop_nginx('END') if defined $PidFile && -f $PidFile;
    }
    check_prev_block_shutdown_error_log();

    if ($Randomize && defined $ServRoot && -d $ServRoot
        && $ServRoot =~ m{/t/servroot_\d+$} && !$ENV{TEST_NGINX_NO_CLEAN})
    {
        remove_tree($ServRoot);
    }
}

1;
